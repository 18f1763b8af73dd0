"""Conversations: the chat stage's data, one JSON object a line.

A conversation dataset is a `.jsonl` file, or a folder of them (read in sorted
order), each line `{"messages": [{"role": ..., "content": ...}, ...]}`: the
format of Hugging Face's chat datasets and OpenAI's fine-tuning files. Roles
are "system" (at most one, first), "user" and "assistant"; every content is a
non-empty string; every conversation has an assistant turn, the only text
the chat stage trains on. Other keys (on a line or a message) are kept and
ignored. `read_conversations` checks every line before returning any, and
ends with one `ConversationError` naming the file, the line and the fix.

`pack` lays tokenized conversations (chat_template.py renders them) into
training rows of block_size + 1 tokens, with a segment id and a loss mask
per token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


# --- Rows: tokenized conversations packed for training ------------------------------


@dataclasses.dataclass(frozen=True)
class Packed:
    """Rows of block_size + 1 tokens: inputs are row[:-1], targets row[1:].

    segments_RL numbers the conversations of a row 1, 2, ... (0: padding), so
    attention stays within one conversation; mask_RL is 1 on the tokens the
    model learns to write (0 on padding). The counts are for logging: cut
    (at the end of an assistant turn, to fit), truncated (inside a turn: no
    turn ended within the context) and dropped (nothing to learn within it)."""

    tokens_RL: np.ndarray  # int32 [rows, block_size + 1]
    segments_RL: np.ndarray  # int32 [rows, block_size + 1]
    mask_RL: np.ndarray  # uint8 [rows, block_size + 1]
    n_cut: int
    n_truncated: int
    n_dropped: int


def fit(ids: np.ndarray, mask: np.ndarray, length: int) -> tuple[int, str]:
    """(how many of the tokens to keep, and how: "whole", "cut", "truncated" or
    "dropped") for a conversation in `length` tokens: whole if it fits, else up
    to the last assistant turn's end (mask 1 -> 0) within it, else the first
    `length` tokens; dropped if what is kept has no token to learn."""
    keep, how = len(ids), "whole"
    if len(ids) > length:
        ends = np.flatnonzero((mask[:length] == 1) & (mask[1 : length + 1] == 0)) + 1
        keep, how = (int(ends[-1]), "cut") if ends.size else (length, "truncated")
    return (keep, how) if mask[:keep].any() else (0, "dropped")


def pack(
    conversations_ids: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    block_size: int,
    pad_id: int = 0,
) -> Packed:
    """Conversations, in order, into rows of block_size + 1 tokens: each goes in
    the current row if it fits, else starts a new one (the rest of the row is
    padding: pad_id, segment 0, mask 0). Shuffle the conversations first."""
    if len(conversations_ids) != len(masks):
        raise ValueError(
            f"{len(conversations_ids)} conversations but {len(masks)} masks."
        )
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, not {block_size}.")
    length = block_size + 1
    rows, row, counts = [], [], {"cut": 0, "truncated": 0, "dropped": 0}
    filled = 0
    for i, (ids, mask) in enumerate(zip(conversations_ids, masks, strict=True)):
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.shape != mask.shape or ids.ndim != 1:
            raise ValueError(
                f"conversation {i}: ids {ids.shape} and mask {mask.shape} must be"
                " one-dimensional and of one length."
            )
        keep, how = fit(ids, mask, length)
        counts[how] = counts.get(how, 0) + 1
        if how == "dropped":
            continue
        if filled + keep > length:
            rows.append(row)
            row, filled = [], 0
        row.append((ids[:keep], mask[:keep]))
        filled += keep
    if row:
        rows.append(row)
    tokens_RL = np.full((len(rows), length), pad_id, np.int32)
    segments_RL = np.zeros((len(rows), length), np.int32)
    mask_RL = np.zeros((len(rows), length), np.uint8)
    for r, pieces in enumerate(rows):
        start = 0
        for segment, (ids, mask) in enumerate(pieces, 1):
            end = start + len(ids)
            tokens_RL[r, start:end] = ids
            segments_RL[r, start:end] = segment
            mask_RL[r, start:end] = mask
            start = end
    return Packed(
        tokens_RL, segments_RL, mask_RL,
        counts["cut"], counts["truncated"], counts["dropped"],
    )  # fmt: skip


def segment_positions(segments_RL: np.ndarray) -> np.ndarray:
    """int32 [rows, L]: each token's position within its conversation (0 at its
    first token; padding counts on from 0 too), so a packed conversation sees
    the positions it would alone."""
    segments_RL = np.asarray(segments_RL)
    index_L = np.arange(segments_RL.shape[-1])
    new_RL = np.ones(segments_RL.shape, bool)
    new_RL[:, 1:] = segments_RL[:, 1:] != segments_RL[:, :-1]
    start_RL = np.maximum.accumulate(np.where(new_RL, index_L, 0), axis=-1)
    return (index_L - start_RL).astype(np.int32)
