"""Conversation files (each bad line ends in one error naming the file, the line
and the fix), packing into rows (hand-computed), and the generated chat task."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxgpt.datasets import chat_tasks, conversations
from jaxgpt.datasets.conversations import ConversationError, pack, read_conversations

USER = {"role": "user", "content": "Hi"}
REPLY = {"role": "assistant", "content": "Hello!"}
GOOD = {"messages": [USER, REPLY]}

# (a bad line, what the error says: the problem and its fix)
BAD_LINES = {
    "not_json": ('{"messages": [', "not JSON (Expecting value at column 15)"),
    "no_messages": (
        '{"text": "Hi"}',
        'no "messages" list: write each line as {"messages"',
    ),
    "messages_not_list": ('{"messages": "Hi"}', 'no "messages" list'),
    "a_list": ("[1, 2]", 'no "messages" list'),
    "empty_messages": ('{"messages": []}', '"messages" is empty: give the turns'),
    "message_not_object": ('{"messages": ["Hi"]}', "message 0 is not an object"),
    "unknown_role": (
        json.dumps({"messages": [{"role": "bot", "content": "x"}, REPLY]}),
        "message 0 has role 'bot': use one of system, user, assistant",
    ),
    "no_content": (
        json.dumps({"messages": [USER, {"role": "assistant"}]}),
        "message 1's content is NoneType, not a string",
    ),
    "number_content": (
        json.dumps({"messages": [USER, {"role": "assistant", "content": 4}]}),
        "message 1's content is int, not a string",
    ),
    "empty_content": (
        json.dumps({"messages": [{"role": "user", "content": ""}, REPLY]}),
        "message 0's content is empty: give it text, or remove the message",
    ),
    "blank_content": (
        json.dumps({"messages": [USER, {"role": "assistant", "content": " \n"}]}),
        "message 1's content is empty",
    ),
    "no_assistant": (
        json.dumps({"messages": [USER]}),
        "no assistant turn, so nothing to train on: add the assistant's reply",
    ),
    "system_not_first": (
        json.dumps(
            {"messages": [USER, {"role": "system", "content": "Be kind."}, REPLY]}
        ),
        "message 1 is a system message after the first: put the system message first",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_line_and_fix(tmp_path, case):
    line, says = BAD_LINES[case]
    path = tmp_path / "chat.jsonl"
    path.write_text(
        f"{json.dumps(GOOD)}\n\n{line}\n{json.dumps(GOOD)}\n", encoding="utf-8"
    )
    with pytest.raises(ConversationError) as e:
        read_conversations(path)
    message = str(e.value)
    assert message.startswith(f"{path}:3: ")  # Line 3: the blank line counts.
    assert says in message
    assert "\n" not in message
    assert isinstance(e.value, ValueError)


def test_first_bad_line_of_a_folder_and_the_count_of_others(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    (tmp_path / "b" / "c.jsonl").write_text("nope\n{}\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"messages": 1}\n', encoding="utf-8")
    with pytest.raises(ConversationError) as e:
        read_conversations(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'b' / 'c.jsonl'}:1: not JSON")
    assert str(e.value).endswith("(and 2 more bad lines).")


def test_folder_reads_files_in_order_and_keeps_extra_keys(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    first = {"messages": [system, USER, REPLY], "id": 7}
    second = {"messages": [USER, {**REPLY, "content": "Bye", "weight": 1}]}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.jsonl").write_text(
        json.dumps(second) + "\n", encoding="utf-8"
    )
    (tmp_path / "1.jsonl").write_text(json.dumps(first) + "\n\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not read", encoding="utf-8")
    assert read_conversations(tmp_path) == [first["messages"], second["messages"]]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p / "missing.jsonl", "does not exist"),
        (lambda p: p, "holds no .jsonl files"),
        (lambda p: write(p / "empty.jsonl", "\n"), "holds no conversations"),
        (lambda p: write(p / "latin.jsonl", b"\xe9\n"), "is not UTF-8 text"),
    ],
)
def test_unusable_paths(tmp_path, make, says):
    with pytest.raises(ConversationError, match=says):
        read_conversations(make(tmp_path))


def write(path, data):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def test_write_then_read(tmp_path):
    records = [GOOD, {"messages": [USER, REPLY, USER, REPLY], "answer": "Hello!"}]
    assert conversations.write_conversations(tmp_path / "c.jsonl", records) == 2
    assert read_conversations(tmp_path / "c.jsonl") == [r["messages"] for r in records]
    with pytest.raises(ConversationError, match="record 1: it has no assistant turn"):
        conversations.write_conversations(
            tmp_path / "d.jsonl", [GOOD, {"messages": [USER]}]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


# --- Packing -------------------------------------------------------------------


def test_pack_is_hand_computed():
    a = ([1, 2, 3], [0, 1, 1])
    b = ([4, 5], [0, 1])
    c = ([6, 7, 8, 9], [0, 0, 1, 1])
    # Too long for 6; assistant turns end after tokens 3 and 6: cut after 6.
    d = ([10, 11, 12, 13, 14, 15, 16, 17], [0, 1, 1, 0, 1, 1, 0, 0])
    # No reply within the first 6 tokens: dropped.
    e = ([20, 21, 22, 23, 24, 25, 26, 27, 28], [0, 0, 0, 0, 0, 0, 0, 1, 1])
    # One reply running past the context: truncated inside it.
    f = ([30, 31, 32, 33, 34, 35, 36, 37], [0, 0, 0, 1, 1, 1, 1, 1])
    g = ([40, 41], [0, 0])  # Nothing to learn at all: dropped.
    convs = [a, b, c, d, e, f, g]
    packed = pack([x for x, _ in convs], [m for _, m in convs], block_size=5, pad_id=99)
    np.testing.assert_array_equal(
        packed.tokens_RL,
        [
            [1, 2, 3, 4, 5, 99],
            [6, 7, 8, 9, 99, 99],
            [10, 11, 12, 13, 14, 15],
            [30, 31, 32, 33, 34, 35],
        ],
    )
    np.testing.assert_array_equal(
        packed.segments_RL,
        [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [1] * 6, [1] * 6],
    )
    np.testing.assert_array_equal(
        packed.mask_RL,
        [
            [0, 1, 1, 0, 1, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 1, 1, 0, 1, 1],
            [0, 0, 0, 1, 1, 1],
        ],
    )
    assert (packed.n_cut, packed.n_truncated, packed.n_dropped) == (1, 1, 2)
    assert packed.tokens_RL.dtype == np.int32
    np.testing.assert_array_equal(
        conversations.segment_positions(packed.segments_RL),
        [
            [0, 1, 2, 0, 1, 0],
            [0, 1, 2, 3, 0, 1],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 2, 3, 4, 5],
        ],
    )


def test_pack_exact_fit_and_nothing():
    packed = pack([np.array([5, 6, 7])], [np.array([0, 1, 1])], block_size=2)
    np.testing.assert_array_equal(packed.tokens_RL, [[5, 6, 7]])
    assert (packed.n_cut, packed.n_truncated, packed.n_dropped) == (0, 0, 0)
    empty = pack([], [], block_size=4)
    assert empty.tokens_RL.shape == empty.mask_RL.shape == (0, 5)
    with pytest.raises(ValueError, match="of one length"):
        pack([np.array([1, 2])], [np.array([1])], block_size=4)


# --- The generated task --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "right"),
    [
        ("42", "42", True),
        ("  42 \n", "42", True),
        ("c  a\tt", "c a t", True),
        ("4 2", "42", False),
        ("42.", "42", False),
        ("", "42", False),
    ],
)
def test_score(prediction, answer, right):
    assert chat_tasks.score(prediction, answer) is right


def test_tasks_are_right_and_splits_disjoint():
    train, test = chat_tasks.make_splits(n_train=300, n_test=100, seed=3)
    assert len(train) == 300 and len(test) == 100
    prompts = [{r["messages"][0]["content"] for r in split} for split in (train, test)]
    assert len(prompts[0]) == 300 and len(prompts[1]) == 100
    assert not prompts[0] & prompts[1]
    assert chat_tasks.make_splits(50, 100, seed=3)[1] == test  # Whatever n_train.
    assert {r["task"] for r in test} == set(chat_tasks.TASKS)
    for r in train + test:  # Each answer recomputed from its task's arguments.
        assert r["answer"] == independent_answer(r["task"], r["args"])
        assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
        assert conversations.check_conversation(r) is None
    assert chat_tasks.make_splits(300, 100, seed=3) == (train, test)
    assert chat_tasks.make_splits(300, 100, seed=4) != (train, test)


def independent_answer(task: str, args: list) -> str:
    if task == "spell":
        return " ".join(args[0])
    if task == "count":
        word, letter = args
        return str(sum(ch == letter for ch in word))
    if task == "add":
        return str(args[0] + args[1])
    return args[0][::-1]


def test_cli_writes_the_splits_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "task"
    cmd = [sys.executable, "-m", "jaxgpt.datasets.chat_tasks", f"--out={out}"]
    args = ["--n_train=20", "--n_test=10", "--seed=1"]
    run = subprocess.run(cmd + args, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    train, test = (
        read_conversations(out / "train.jsonl"),
        read_conversations(out / "test.jsonl"),
    )
    assert (len(train), len(test)) == (20, 10)
    expected = chat_tasks.make_splits(20, 10, seed=1)[1]
    assert test == [r["messages"] for r in expected]
    before = (out / "train.jsonl").read_bytes()
    again = subprocess.run(cmd + args, capture_output=True, text=True, check=False)
    assert again.returncode != 0
    assert again.stderr.strip().count("\n") == 0
    assert again.stderr.startswith("error: ") and "already holds" in again.stderr
    assert (out / "train.jsonl").read_bytes() == before
    for flags, says in [
        (["--n_test=0"], "n_test must be at least 1"),
        (["--seed=x"], "--seed"),
    ]:
        cmd = [
            sys.executable,
            "-m",
            "jaxgpt.datasets.chat_tasks",
            f"--out={tmp_path / 'x'}",
        ]
        bad = subprocess.run(cmd + flags, capture_output=True, text=True, check=False)
        assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
        assert bad.stderr.startswith("error: ") and says in bad.stderr
    assert not (tmp_path / "x").exists()
