"""Conversations: the chat stage's data, one JSON object a line.

A conversation dataset is a `.jsonl` file, or a folder of them (read in sorted
order), each line `{"messages": [{"role": ..., "content": ...}, ...]}`: the
format of Hugging Face's chat datasets and OpenAI's fine-tuning files. Roles
are "system" (at most one, first), "user" and "assistant"; every content is a
non-empty string; every conversation has an assistant turn, the only text
the chat stage trains on. Other keys (on a line or a message) are kept and
ignored. `read_conversations` checks every line before returning any, and
ends with one `ConversationError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
EXAMPLE = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'

Message = dict[str, Any]
Conversation = list[Message]


class ConversationError(ValueError):
    """A conversation file that cannot be used; the message says where and the fix."""


def check_conversation(record: Any) -> str | None:
    """What is wrong with one parsed line (and how to fix it), or None."""
    if not isinstance(record, Mapping) or not isinstance(record.get("messages"), list):
        return f'it has no "messages" list: write each line as {EXAMPLE}'
    messages = record["messages"]
    if not messages:
        return '"messages" is empty: give the turns of the conversation'
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            return (
                f'{where} is not an object: write it as {{"role": ..., "content": ...}}'
            )
        role = message.get("role")
        if role not in ROLES:
            return f"{where} has role {role!r}: use one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return (
                f"{where}'s content is {type(content).__name__}, not a string:"
                " give its text as one string"
            )
        if not content.strip():
            return f"{where}'s content is empty: give it text, or remove the message"
        if role == "system" and i > 0:
            return (
                f"{where} is a system message after the first: put the system"
                " message first (at most one)"
            )
    if not any(m["role"] == "assistant" for m in messages):
        return (
            "it has no assistant turn, so nothing to train on: add the assistant's"
            " reply, or remove the line"
        )
    return None


def jsonl_files(path: str | Path) -> list[Path]:
    """The `.jsonl` files a path names: itself, or a folder's (sorted, recursive)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise ConversationError(
                f"{path} holds no .jsonl files: give a conversation file or a folder"
                " of them."
            )
        return files
    if not path.is_file():
        raise ConversationError(
            f"{path} does not exist: give a conversation .jsonl file or a folder of them."
        )
    return [path]


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a `.jsonl` file or a folder of them, each a list of
    messages; every line is checked first, and a bad one raises one
    ConversationError naming the file, the line number (from 1) and the fix
    (and how many other lines are bad). Blank lines are skipped."""
    conversations, bad = [], []
    for file in jsonl_files(path):
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConversationError(
                f"{file} is not UTF-8 text ({e.reason} at byte {e.start}): save it as"
                " UTF-8 JSON lines."
            ) from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(
                    f"{file}:{number}: not JSON ({e.msg} at column {e.colno}): write"
                    f" each line as one JSON object, e.g. {EXAMPLE}"
                )
                continue
            if problem := check_conversation(record):
                bad.append(f"{file}:{number}: {problem}")
                continue
            conversations.append(record["messages"])
    if bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise ConversationError(f"{bad[0]}{more}.")
    if not conversations:
        raise ConversationError(
            f"{path} holds no conversations: add lines such as {EXAMPLE}"
        )
    return conversations


def write_conversations(path: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes records (each with "messages", checked) as JSON lines, under a
    temporary name renamed when complete; returns how many were written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            if problem := check_conversation(record):
                tmp.unlink()
                raise ConversationError(f"record {n}: {problem}.")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def split_prompt(messages: Sequence[Message]) -> tuple[list[Message], str | None]:
    """(the messages before the last assistant turn, that turn's content): a
    test conversation as a prompt and its reference answer."""
    messages = list(messages)
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None
