"""Model files from --init_from are untrusted input: every reader of them
(the torch .bin reader, safetensors, sharded indexes, config.json) ends a bad
file with one HuggingFaceError naming it, never a crash or a silent read.

The truth for a torch .bin is computed here without numpy's strides: each
element of a view is looked up by hand (offset + sum(index * stride)) in the
storage's bytes, as read from the zip with zipfile.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt.hub import gpt2, hf, llama, load


def torch_or_skip():
    return pytest.importorskip(
        "torch", reason='needs PyTorch (pip install -e ".[test]")'
    )


def assert_one_error(excinfo, *words: str) -> None:
    message = str(excinfo.value)
    assert excinfo.type is hf.HuggingFaceError, message
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# ------------------------------------------------- a torch .bin, taken apart

INT_OPS = {"BININT1", "BININT2", "BININT", "LONG1", "LONG4", "INT", "LONG"}
STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8"}
TUPLE_OPS = {"EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"}
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
}


class Field(collections.namedtuple("Field", "start end tensor role")):
    """One value in data.pkl: bytes [start, end) of tensor `tensor`'s `role`
    (key, numel, offset, size, stride; index i of size/stride: role.i)."""


def take_apart(pkl: bytes) -> tuple[list[Field], list[dict[str, Any]]]:
    """The fields of every tensor in a torch.save pickle, and each tensor's
    spec: name, dtype, key, numel, offset, size, stride."""
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    fields, specs, memo = [], [], {}
    state, last, name, name_before = None, None, None, None
    for (op, arg, pos), end in zip(ops, ends):
        kind = op.name
        if kind in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        if kind in ("BINGET", "LONG_BINGET"):
            last = memo.get(arg)
            kind = "GLOBAL" if isinstance(last, tuple) else "MEMO"
        elif kind == "GLOBAL":
            last = tuple(arg.split(" "))
        elif kind in STR_OPS:
            last = arg
        else:
            last = None
        spec = specs[-1] if specs else None
        if kind == "GLOBAL" and last == ("torch._utils", "_rebuild_tensor_v2"):
            name = name_before
        elif kind == "GLOBAL" and last[0] == "torch" and last[1].endswith("Storage"):
            specs.append({"name": name, "dtype": last[1], "size": [], "stride": []})
            state = "key"
        elif state == "key" and kind in STR_OPS:
            fields.append(Field(pos, end, len(specs) - 1, "key"))
            spec["key"], state = arg, "numel"
        elif state == "numel" and kind in INT_OPS:
            fields.append(Field(pos, end, len(specs) - 1, "numel"))
            spec["numel"], state = arg, "pid"
        elif kind == "BINPERSID":
            state = "offset"
        elif state == "offset" and kind in INT_OPS:
            fields.append(Field(pos, end, len(specs) - 1, "offset"))
            spec["offset"], state = arg, "size"
        elif state in ("size", "stride") and kind in INT_OPS:
            fields.append(
                Field(pos, end, len(specs) - 1, f"{state}.{len(spec[state])}")
            )
            spec[state].append(arg)
        elif state in ("size", "stride") and kind in TUPLE_OPS:
            state = "stride" if state == "size" else None
        if kind in STR_OPS and state is None:
            name_before = arg
    return fields, specs


def encode(value: Any) -> bytes:
    """One pickle opcode pushing `value`."""
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return b"X" + len(data).to_bytes(4, "little") + data
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + value.to_bytes(2, "little")
    if -(2**31) <= value < 2**31:
        return b"J" + value.to_bytes(4, "little", signed=True)
    data = pickle.encode_long(value)
    if len(data) < 256:
        return b"\x8a" + bytes([len(data)]) + data
    return b"\x8b" + len(data).to_bytes(4, "little") + data


def mutate(pkl: bytes, fields: list[Field], changes: dict[int, Any]) -> bytes:
    """pkl with field i's value replaced by changes[i]."""
    for i in sorted(changes, key=lambda i: fields[i].start, reverse=True):
        f = fields[i]
        pkl = pkl[: f.start] + encode(changes[i]) + pkl[f.end :]
    return pkl


def zip_bytes(entries: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def patch_sizes(data: bytes, name: str, file_size: int, compress_size=None) -> bytes:
    """A zip whose central directory declares other sizes for entry `name`."""
    data, at = bytearray(data), 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        n = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + n] == name.encode():
            if compress_size is not None:
                data[at + 20 : at + 24] = compress_size.to_bytes(4, "little")
            data[at + 24 : at + 28] = file_size.to_bytes(4, "little")
            return bytes(data)
        at += 4
    raise KeyError(name)


class TorchFile:
    """A valid torch.save'd state dict, its zip entries and data.pkl's fields."""

    def __init__(self, state_dict):
        torch = torch_or_skip()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        with zipfile.ZipFile(buffer) as archive:
            self.entries = {n: archive.read(n) for n in archive.namelist()}
        self.pkl_name = next(n for n in self.entries if n.endswith("data.pkl"))
        self.root = self.pkl_name[: -len("data.pkl")]
        self.fields, self.specs = take_apart(self.entries[self.pkl_name])

    def field(self, tensor_name: str, role: str) -> int:
        return next(
            i
            for i, f in enumerate(self.fields)
            if self.specs[f.tensor]["name"] == tensor_name and f.role == role
        )

    def with_changes(self, changes: dict[int, Any], **kw) -> bytes:
        pkl = mutate(self.entries[self.pkl_name], self.fields, changes)
        return zip_bytes({**self.entries, self.pkl_name: pkl}, **kw)

    def changed_specs(self, changes: dict[int, Any]) -> list[dict[str, Any]]:
        specs = [
            {**s, "size": [*s["size"]], "stride": [*s["stride"]]} for s in self.specs
        ]
        for i, value in changes.items():
            f = self.fields[i]
            role, _, index = f.role.partition(".")
            if index:
                specs[f.tensor][role][int(index)] = value
            else:
                specs[f.tensor][role] = value
        return specs

    def truth(self, spec: dict[str, Any]) -> np.ndarray | None:
        """The tensor `spec` describes, each element looked up by hand in its
        storage's bytes; None where the reader must refuse it: a value that is
        not a non-negative int (or over 2^56), a storage the archive lacks or
        whose bytes are not numel * itemsize, an element outside the storage, or
        more elements than the storage holds."""
        key, numel, offset = spec["key"], spec["numel"], spec["offset"]
        size, stride = spec["size"], spec["stride"]
        counts = (numel, offset, *size, *stride)
        if not all(type(x) is int and 0 <= x for x in counts):
            return None
        if max(*size, *stride, 0) > 2**56 or not isinstance(key, str):
            return None
        data = self.entries.get(f"{self.root}data/{key}")
        dtype = STORAGE_DTYPES[spec["dtype"]]
        if data is None or len(data) != numel * dtype.itemsize or offset > numel:
            return None
        flat = np.frombuffer(data, dtype)
        n = math.prod(size)
        if n == 0:
            return np.zeros(size, dtype)
        if n > numel:
            return None
        values = []
        for index in itertools.product(*(range(s) for s in size)):
            at = offset + sum(i * s for i, s in zip(index, stride))
            if at >= numel:
                return None
            values.append(flat[at])
        return np.array(values, dtype).reshape(size)


def small_state_dict():
    torch = torch_or_skip()
    grid = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 8
    return collections.OrderedDict(
        w=torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5,
        half=torch.tensor([1.5, -2.0, 0.25, 8.0], dtype=torch.float16),
        bf16=torch.tensor([3.0, -1.0], dtype=torch.bfloat16),
        view=grid[1:, ::2],  # offset 4, size (3, 2), stride (4, 2) of 16.
    )


@pytest.fixture(scope="module")
def small_bin():
    return TorchFile(small_state_dict())


def test_take_apart_finds_every_view(small_bin):
    """The test's own parser reads the views torch wrote (so mutations hit them)."""
    by_name = {s["name"]: s for s in small_bin.specs}
    assert by_name["view"]["offset"] == 4
    assert by_name["view"]["size"] == [3, 2] and by_name["view"]["stride"] == [4, 2]
    assert by_name["half"]["dtype"] == "HalfStorage" and by_name["half"]["numel"] == 4
    assert len(small_bin.fields) == sum(3 + 2 * len(s["size"]) for s in small_bin.specs)


def test_valid_file_reads_as_torch_and_by_hand(small_bin, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(small_bin.with_changes({}))
    got = hf.read_torch_state_dict(str(path))
    want = small_state_dict()
    assert list(got) == list(want)
    for spec in small_bin.specs:
        truth = small_bin.truth(spec)
        np.testing.assert_array_equal(got[spec["name"]], truth)
        assert got[spec["name"]].dtype == truth.dtype
        np.testing.assert_array_equal(
            got[spec["name"]].astype(np.float32), want[spec["name"]].float().numpy()
        )


@pytest.mark.parametrize(
    "tensor,changes,works",
    [
        # The two views that once crashed or read past the buffer.
        ("w", {"stride.0": 10**6}, "reaches past"),
        ("w", {"offset": 100}, "reaches past"),
        ("w", {"offset": 1}, "reaches past"),  # The last element, one past.
        ("view", {"offset": 6}, "reaches past"),  # Last: 6 + 2*4 + 1*2 = 16 of 16.
        ("view", {"size.0": 4}, "reaches past"),
        ("w", {"size.1": 10**9, "stride.1": 0}, "more than its storage"),
        ("w", {"numel": 7}, "entry holds 24 bytes"),
        ("w", {"numel": 2**70}, "entry holds 24 bytes"),
        ("w", {"key": "9"}, "which the archive lacks"),
        ("w", {"key": "../../etc/passwd"}, "which the archive lacks"),
        ("w", {"key": 0}, "not a storage key"),
        ("half", {"key": "0"}, "entry holds 24 bytes"),  # Another storage.
        ("w", {"offset": -1}, "non-negative integers"),
        ("w", {"stride.0": -3}, "non-negative integers"),
        ("w", {"size.0": -2}, "non-negative integers"),
        ("w", {"size.0": 1.0}, "non-negative integers"),
        ("w", {"offset": True}, "non-negative integers"),
        ("w", {"stride.1": 2**60}, "non-negative integers"),
        ("w", {"numel": None}, "a storage of None elements"),
    ],
)
def test_bad_views_are_refused_naming_file_and_tensor(
    small_bin, tmp_path, tensor, changes, works
):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(
        small_bin.with_changes(
            {small_bin.field(tensor, r): v for r, v in changes.items()}
        )
    )
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_torch_state_dict(str(path))
    assert_one_error(e, str(path), f"tensor {tensor!r}", works)


@pytest.mark.parametrize(
    "tensor,changes",
    [
        ("w", {"stride.0": 0}),  # Row 0 twice: a broadcast view.
        ("w", {"size.0": 3, "size.1": 2, "stride.0": 2}),  # A reshape.
        ("w", {"size.0": 3, "size.1": 2, "stride.0": 1, "stride.1": 3}),  # .T
        ("w", {"size.0": 0, "size.1": 10**9}),  # Empty.
        ("w", {"offset": 6, "size.0": 0}),  # Empty, at the storage's end.
        ("view", {"offset": 5, "size.0": 2}),
        ("view", {"size.0": 1, "stride.0": 2**40}),  # A size-1 dimension's stride.
    ],
)
def test_other_views_inside_their_storage_read_correctly(
    small_bin, tmp_path, tensor, changes
):
    changed = {small_bin.field(tensor, r): v for r, v in changes.items()}
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(small_bin.with_changes(changed))
    got = hf.read_torch_state_dict(str(path))
    for spec in small_bin.changed_specs(changed):
        truth = small_bin.truth(spec)
        assert truth is not None
        np.testing.assert_array_equal(got[spec["name"]], truth)
        assert got[spec["name"]].shape == truth.shape


def test_storage_types_and_objects_jaxgpt_does_not_read(small_bin, tmp_path):
    pkl = small_bin.entries[small_bin.pkl_name]
    path = tmp_path / "pytorch_model.bin"
    long_pkl = pkl.replace(b"torch\nHalfStorage", b"torch\nLongStorage")
    path.write_bytes(zip_bytes({**small_bin.entries, small_bin.pkl_name: long_pkl}))
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_torch_state_dict(str(path))
    assert_one_error(e, str(path), "tensor 'half'", "torch.LongStorage")
    evil = pkl.replace(b"torch\nHalfStorage", b"posix\nsystem\x20\x20\x20\x20\x20")
    path.write_bytes(zip_bytes({**small_bin.entries, small_bin.pkl_name: evil}))
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_torch_state_dict(str(path))
    assert_one_error(e, str(path), "not only tensors")
    for root in (b"\x80\x02]q\x00.", b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."):
        path.write_bytes(zip_bytes({**small_bin.entries, small_bin.pkl_name: root}))
        with pytest.raises(hf.HuggingFaceError) as e:
            hf.read_torch_state_dict(str(path))
        assert_one_error(e, str(path), "not a state dict" if root[2] == 93 else "'a'")


def test_a_memo_bomb_is_refused(small_bin, tmp_path):
    """A 6-byte opcode that would make the unpickler grow its memo table to
    2^26 entries (2^31: 16 GB) is refused before unpickling."""
    pkl = small_bin.entries[small_bin.pkl_name]
    assert pkl.count(b"q\x00") == 1  # BINPUT 0: the first memo entry.
    bomb = pkl.replace(b"q\x00", b"r" + (2**26).to_bytes(4, "little"))
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(zip_bytes({**small_bin.entries, small_bin.pkl_name: bomb}))
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_torch_state_dict(str(path))
    assert_one_error(e, str(path), "memo entry 67108864")


def test_tensors_of_one_storage_share_its_bytes(tmp_path):
    """Tied weights and views: each reads as torch has it, none copies the storage."""
    torch = torch_or_skip()
    t = torch.arange(12, dtype=torch.float32)
    state_dict = {"a": t, "b": t[2:8].view(2, 3), "c": t.view(3, 4).T}
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    got = hf.read_torch_state_dict(str(tmp_path / "pytorch_model.bin"))
    for name, tensor in state_dict.items():
        np.testing.assert_array_equal(got[name], tensor.numpy())
    assert np.shares_memory(got["a"], got["b"]) and np.shares_memory(got["a"], got["c"])
    assert not got["a"].flags.writeable


# A value for a field: mostly small ints (many views of the small storages
# are valid), and huge ints and other types.
FIELD_VALUES = st.one_of(
    st.integers(0, 4),
    st.integers(0, 8),
    st.integers(-3, 24),
    st.integers(),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**56, 2**56 + 1, 2**63, 2**64]),
    st.sampled_from([-(2**63), 10**30, 2**1000, -(2**1000)]),
    st.sampled_from([None, True, False, 1.5, "0", "1", "2", "3", "9", "../0", ""]),
)


@settings(max_examples=1000, deadline=None)
@given(
    changes=st.dictionaries(st.integers(0, 25), FIELD_VALUES, min_size=1, max_size=2)
)
def test_mutated_views_read_correctly_or_fail_in_one_error(
    small_bin, tmp_path_factory, changes
):
    """Changing any offset, size, stride, numel or storage key of a valid file:
    each tensor reads as its storage's bytes looked up by hand, or the reader
    raises its one error naming the file (never a crash, or other exception)."""
    changes = {i % len(small_bin.fields): v for i, v in changes.items()}
    path = tmp_path_factory.getbasetemp() / "mutated_pytorch_model.bin"
    path.write_bytes(small_bin.with_changes(changes))
    truths = [small_bin.truth(s) for s in small_bin.changed_specs(changes)]
    try:
        got = hf.read_torch_state_dict(str(path))
    except hf.HuggingFaceError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        assert any(t is None for t in truths), str(e)
        return
    assert all(t is not None for t in truths), changes
    for spec, truth in zip(small_bin.specs, truths):
        np.testing.assert_array_equal(got[spec["name"]], truth)
        assert got[spec["name"]].dtype == truth.dtype
        assert got[spec["name"]].shape == truth.shape


@settings(max_examples=500, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10**6),
)
def test_any_damaged_pickle_reads_or_fails_in_one_error(
    small_bin, tmp_path_factory, flips, cut
):
    """Any bytes of data.pkl changed (and maybe some cut): a dict of arrays or
    the one error naming the file; never a crash, another exception, or a
    request for more memory than the file could justify (a MemoryError)."""
    pkl = bytearray(small_bin.entries[small_bin.pkl_name])
    for at, value in flips:
        pkl[at % len(pkl)] = value
    if cut % 5 == 0:
        del pkl[cut % len(pkl) : cut % len(pkl) + 1 + cut % 7]
    path = tmp_path_factory.getbasetemp() / "flipped_pytorch_model.bin"
    path.write_bytes(zip_bytes({**small_bin.entries, small_bin.pkl_name: bytes(pkl)}))
    try:
        got = hf.read_torch_state_dict(str(path))
    except hf.HuggingFaceError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        assert "MemoryError" not in str(e), str(e)
        return
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in got.items())


# ------------------------------------------------------------ zip entries


def test_zip_entries_are_read_only_as_far_as_they_can_hold(
    small_bin, tmp_path, monkeypatch
):
    path = tmp_path / "pytorch_model.bin"
    good = small_bin.with_changes({})
    storage = f"{small_bin.root}data/0"  # w's: 24 bytes.

    def refused(data: bytes, *words: str) -> None:
        path.write_bytes(data)
        with pytest.raises(hf.HuggingFaceError) as e:
            hf.read_torch_state_dict(str(path))
        assert_one_error(e, str(path), *words)

    # A stored entry that claims more bytes than it has (and than w needs).
    refused(patch_sizes(good, storage, 10**9), "entry holds 1000000000 bytes")
    # ... and a numel to match: more than the 24 stored bytes can hold.
    numel = small_bin.field("w", "numel")
    refused(
        patch_sizes(small_bin.with_changes({numel: 10**8}), storage, 4 * 10**8),
        "claims 400000000 bytes from 24 stored",
    )
    # A deflated entry (a decompression bomb's header) claiming more than
    # deflate can make of its bytes.
    deflated = small_bin.with_changes({numel: 10**8}, method=zipfile.ZIP_DEFLATED)
    refused(patch_sizes(deflated, storage, 4 * 10**8), "decompression bomb")
    # A header that claims fewer bytes than the entry has: only those are read
    # (their checksum then fails).
    refused(
        patch_sizes(
            small_bin.with_changes({numel: 4, small_bin.field("w", "size.0"): 1}),
            storage,
            16,
            16,
        ),
        "tensor 'w'",
        "cannot be read",
    )
    # data.pkl declared over the limit, other compression, no data.pkl at all.
    monkeypatch.setattr(hf, "PICKLE_LIMIT", 100)
    refused(good, "data.pkl", "the most it may hold is 100")
    monkeypatch.undo()
    refused(zip_bytes(small_bin.entries, zipfile.ZIP_BZIP2), "compression method 12")
    entries = {k: v for k, v in small_bin.entries.items() if k != small_bin.pkl_name}
    refused(zip_bytes(entries), "no data.pkl")
    refused(good[: len(good) // 2], "legacy")  # No central directory: not a zip.
    damaged = bytearray(good)
    damaged[damaged.find(b"PK\x01\x02") + 2] = 0  # A central directory's.
    refused(bytes(damaged), "cannot be read", "damaged")
    # Storages past this machine's memory, each and together.
    monkeypatch.setattr(hf, "physical_memory", lambda: 20)
    refused(good, "entry", "the most it may hold is 20")
    monkeypatch.setattr(hf, "physical_memory", lambda: 30)
    refused(good, "need more than this machine's")


def test_honest_compressed_entries_read(small_bin, tmp_path):
    """A deflated archive (and a large storage of zeros, deflated 1000-fold)
    reads as the stored one does."""
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(small_bin.with_changes({}, method=zipfile.ZIP_DEFLATED))
    got = hf.read_torch_state_dict(str(path))
    for spec in small_bin.specs:
        np.testing.assert_array_equal(got[spec["name"]], small_bin.truth(spec))
    zeros = TorchFile({"z": torch_or_skip().zeros(1 << 20)})
    path.write_bytes(zeros.with_changes({}, method=zipfile.ZIP_DEFLATED))
    assert not hf.read_torch_state_dict(str(path))["z"].any()


# ---------------------------------------------- a GPT-2 folder, through main

TINY_GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 64,
    "n_positions": 16,
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
}


def gpt2_bin_folder(folder, changes: dict[str, Any]) -> str:
    """A tiny GPT-2 folder with a pytorch_model.bin; changes: role -> value for
    h.0.attn.c_attn.weight's view."""
    torch = torch_or_skip()
    cfg = gpt2.config_from_hf(TINY_GPT2)
    rng = np.random.default_rng(0)
    state_dict = collections.OrderedDict(
        (gpt2.PREFIX + name, torch.from_numpy(rng.standard_normal(shape, np.float32)))
        for name, shape in gpt2.hf_shapes(cfg).items()
    )
    file = TorchFile(state_dict)
    name = gpt2.PREFIX + "h.0.attn.c_attn.weight"
    (folder / "config.json").write_text(json.dumps(TINY_GPT2))
    (folder / "pytorch_model.bin").write_bytes(
        file.with_changes({file.field(name, r): v for r, v in changes.items()})
    )
    return str(folder)


def test_main_ends_a_bad_view_in_one_error_line(tmp_path):
    """The stride that once made `--mode=sample` die of a segmentation fault."""
    (tmp_path / "model").mkdir()
    folder = gpt2_bin_folder(tmp_path / "model", {"stride.0": 10**6})
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.main", "--mode=sample", f"--init_from={folder}"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert done.returncode > 0, done.stderr[-3000:]  # Not killed by a signal.
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert os.path.join(folder, "pytorch_model.bin") in errors[0]
    assert "'transformer.h.0.attn.c_attn.weight'" in errors[0]


def test_load_gpt2_refuses_an_offset_past_the_storage(tmp_path):
    """The view that once built a model from the memory after the buffer."""
    (tmp_path / "model").mkdir()
    folder = gpt2_bin_folder(tmp_path / "model", {"offset": 16 * 48})
    with pytest.raises(hf.HuggingFaceError) as e:
        load.read_model(folder)
    assert_one_error(e, "pytorch_model.bin", "h.0.attn.c_attn.weight", "reaches past")
    ok = gpt2_bin_folder(tmp_path / "model", {})  # The same folder, untouched.
    cfg, _ = load.read_model(ok)
    assert cfg.n_embd == 16 and cfg.n_layer == 1


# ---------------------------------------------------------- safetensors


def st_bytes(header: Any, data: bytes = bytes(24), length: int | None = None) -> bytes:
    """A safetensors file: an 8-byte header length, the JSON header, the data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32_2x3 = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
SAFETENSORS_DAMAGE = {
    "empty file": b"",
    "truncated": st_bytes({"w": F32_2x3})[:-5],
    "header length past the end": st_bytes({"w": F32_2x3}, length=10**6),
    "header length 2^63": st_bytes({"w": F32_2x3}, length=2**63),
    "header not JSON": struct.pack("<Q", 10) + b"not json!!" + bytes(24),
    "header not UTF-8": struct.pack("<Q", 4) + b"\xff\xfe{}" + bytes(24),
    "header a list": st_bytes([1, 2]),
    "offsets past the end": st_bytes(
        {"w": {**F32_2x3, "data_offsets": [0, 2400]}}, bytes(2400)[:24]
    ),
    "shape larger than its bytes": st_bytes({"w": {**F32_2x3, "shape": [20, 3]}}),
    "shape of 2^80 elements": st_bytes({"w": {**F32_2x3, "shape": [2**40, 2**40]}}),
    "negative shape": st_bytes({"w": {**F32_2x3, "shape": [-2, -3]}}),
    "unknown dtype": st_bytes({"w": {**F32_2x3, "dtype": "Q8"}}),
    "dtype numpy lacks": st_bytes(
        {"w": {**F32_2x3, "dtype": "F8_E4M3", "shape": [24]}}
    ),
    "offsets reversed": st_bytes({"w": {**F32_2x3, "data_offsets": [24, 0]}}),
    "tensors overlapping": st_bytes(
        {"w": F32_2x3, "v": {**F32_2x3, "shape": [6], "data_offsets": [0, 24]}}
    ),
    "bytes after the data": st_bytes({"w": F32_2x3}) + b"junk",
}


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE)
def test_damaged_safetensors_end_in_one_error_naming_the_file(tmp_path, damage):
    (tmp_path / "config.json").write_text(json.dumps(TINY_GPT2))
    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS_DAMAGE[damage])
    for read in (load.read_model, hf.read_weights):
        with pytest.raises(hf.HuggingFaceError) as e:
            read(str(tmp_path))
        assert_one_error(e, str(path), "cannot be read")


def test_a_valid_safetensors_file_reads(tmp_path):
    """The control for the table above: its undamaged file reads."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_bytes({"w": F32_2x3}, np.arange(6, dtype="<f4").tobytes()))
    got = hf.read_safetensors(str(path))["w"]
    np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3))


# ------------------------------------------------------------ shard indexes

SHARD = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


def write_shard(path, kind: str) -> None:
    if kind == "safetensors":
        safetensors.numpy.save_file(SHARD, str(path))
    else:
        torch = torch_or_skip()
        torch.save({k: torch.from_numpy(v) for k, v in SHARD.items()}, str(path))


def sharded_folder(tmp_path, kind: str, shard_name: Any) -> tuple[str, str]:
    """(folder, its index) whose index names `shard_name` for tensor w; beside
    the folder lies a valid shard (outside.*), and /tmp/... links can point at it."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_shard(tmp_path / f"outside.{kind}", kind)
    index = folder / (hf.ST_INDEX if kind == "safetensors" else hf.BIN_INDEX)
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard_name}}))
    return str(folder), str(index)


OUTSIDE_NAMES = {
    "parent": lambda tmp, kind: f"../outside.{kind}",
    "absolute": lambda tmp, kind: str(tmp / f"outside.{kind}"),
    "subfolder": lambda tmp, kind: f"sub/../../outside.{kind}",
    "empty": lambda tmp, kind: "",
    "dot dot": lambda tmp, kind: "..",
}


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("case", OUTSIDE_NAMES)
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, kind, case):
    folder, index = sharded_folder(tmp_path, kind, OUTSIDE_NAMES[case](tmp_path, kind))
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_weights(folder)
    assert_one_error(e, index, "not a file name in", "refused")


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("target", ["../outside", "/dev/zero", "/proc/self/environ"])
def test_index_naming_a_link_out_of_the_folder_is_refused(tmp_path, kind, target):
    folder, index = sharded_folder(tmp_path, kind, f"shard.{kind}")
    target = f"{target}.{kind}" if target == "../outside" else target
    os.symlink(target, os.path.join(folder, f"shard.{kind}"))
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_weights(folder)
    assert_one_error(e, index, "outside", "refused")


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_shards_in_the_folder_and_the_hub_cache_read(tmp_path, kind):
    """Controls: a shard in the folder, one linked to another file in it, and
    the Hub cache's layout (snapshots/<rev>/name -> ../../blobs/<hash>) read."""
    folder, _ = sharded_folder(tmp_path, kind, f"shard.{kind}")
    write_shard(os.path.join(folder, f"shard.{kind}"), kind)
    np.testing.assert_array_equal(hf.read_weights(folder)["w"], SHARD["w"])
    os.rename(os.path.join(folder, f"shard.{kind}"), os.path.join(folder, "real"))
    os.symlink("real", os.path.join(folder, f"shard.{kind}"))
    np.testing.assert_array_equal(hf.read_weights(folder)["w"], SHARD["w"])
    repo = tmp_path / "models--owner--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    write_shard(repo / "blobs" / "deadbeef", kind)
    os.symlink("../../blobs/deadbeef", snapshot / f"shard.{kind}")
    index = hf.ST_INDEX if kind == "safetensors" else hf.BIN_INDEX
    os.rename(os.path.join(folder, index), snapshot / index)
    np.testing.assert_array_equal(hf.read_weights(str(snapshot))["w"], SHARD["w"])


@pytest.mark.parametrize(
    "index_text,words",
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "no weight_map"),
        ('{"weight_map": ["shard"]}', "no weight_map"),
        ('{"weight_map": {"w": ["a", "b"]}}', "no weight_map"),
        ('{"weight_map": {"w": 7}}', "no weight_map"),
        ('{"weight_map": {"w": "absent.safetensors"}}', "not in"),
        pytest.param("[" * 100000 + "]" * 100000, "is not JSON", id="nested-1e5"),
    ],
)
def test_damaged_indexes_are_refused(tmp_path, index_text, words):
    (tmp_path / hf.ST_INDEX).write_text(index_text)
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_weights(str(tmp_path))
    assert_one_error(e, hf.ST_INDEX, words)


def test_oversized_json_files_are_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "JSON_LIMIT", 100)
    (tmp_path / hf.ST_INDEX).write_text(json.dumps({"weight_map": {}, "x": "y" * 200}))
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_weights(str(tmp_path))
    assert_one_error(e, hf.ST_INDEX, "more than such a file's 100")
    (tmp_path / "config.json").write_text(json.dumps({**TINY_GPT2, "x": "y" * 200}))
    with pytest.raises(hf.HuggingFaceError) as e:
        load.read_model(str(tmp_path))
    assert_one_error(e, "config.json", "more than such a file's 100")


# ------------------------------------------------------------ config.json

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def test_parameter_estimates_match_the_released_models():
    """GPT-2 124M (transformers' defaults) and SmolLM2-135M, as published."""
    assert gpt2.n_params({}, "config.json") == 124_439_808
    smollm2 = {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    }
    assert llama.n_params(smollm2) == 134_515_008


@pytest.mark.parametrize(
    "base,change,words",
    [
        ({"model_type": "gpt2"}, {"n_layer": 10**6}, "GB"),
        (TINY_GPT2, {"vocab_size": 10**12}, "GB"),
        (TINY_GPT2, {"n_embd": 10**7}, "GB"),
        (TINY_GPT2, {"n_positions": 10**12}, "GB"),
        (TINY_GPT2, {"n_layer": 10**400}, "GB"),
        (TINY_GPT2, {"n_layer": "12"}, "n_layer='12': it must be a positive integer"),
        (TINY_GPT2, {"n_layer": -1}, "n_layer=-1"),
        (TINY_GPT2, {"n_embd": 0}, "n_embd=0"),
        (TINY_GPT2, {"n_embd": 1.5}, "n_embd=1.5"),
        (TINY_GPT2, {"vocab_size": True}, "vocab_size=True"),
        (TINY_GPT2, {"n_positions": [1]}, "n_positions=<a list>"),
        ({"model_type": "llama"}, {"num_hidden_layers": 10**6}, "GB"),
        (LLAMA, {"vocab_size": 10**12}, "GB"),
        (LLAMA, {"intermediate_size": 10**12}, "GB"),
        (LLAMA, {"hidden_size": 10**9, "num_attention_heads": 1}, "GB"),
        (LLAMA, {"num_attention_heads": 0}, "num_attention_heads=0"),
        (LLAMA, {"head_dim": "x"}, "head_dim='x'"),
        (LLAMA, {"num_key_value_heads": 10**12}, "must divide"),
        # A hang once: listing the divisors of 10^12 query heads.
        (LLAMA, {"num_attention_heads": 10**12, "num_key_value_heads": 7}, "divide"),
    ],
)
def test_config_sizes_are_refused_before_anything_is_read(
    tmp_path, monkeypatch, base, change, words
):
    """Sizes that are no positive integers, or whose float32 parameters cannot
    fit in this machine's memory: one error naming config.json (and the
    estimate and the memory), before any weight file is opened."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**base, **change}))
    monkeypatch.setattr(hf, "read_weights", lambda folder: pytest.fail("read"))
    with pytest.raises(hf.HuggingFaceError) as e:
        load.read_model(str(tmp_path))
    assert_one_error(e, str(config), words)
    if words == "GB":
        assert f"{hf.physical_memory() / 1e9:.1f} GB of memory" in str(e.value)


def test_memory_estimate_names_gigabytes(tmp_path, monkeypatch):
    """GPT-2 124M (0.50 GB of float32) on a machine of 0.4 GB."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(hf, "physical_memory", lambda: 400_000_000)
    with pytest.raises(hf.HuggingFaceError) as e:
        load.read_model(str(tmp_path))
    assert_one_error(e, "about 0.5 GB in float32", "this machine's 0.4 GB")


@pytest.mark.parametrize(
    "change",
    [
        {"rms_norm_eps": "x"},
        {"rope_parameters": [1]},
        {"rope_scaling": "linear"},
        {"rope_theta": "fast"},
        {"hidden_size": 15},  # Not divisible by its heads.
    ],
)
def test_llama_config_values_that_are_not_options(change):
    with pytest.raises(hf.HuggingFaceError) as e:
        llama.config_from_hf({**LLAMA, **change})
    assert_one_error(e, "config.json")


def test_llama_tokenizer_config_that_is_not_an_object(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.load_tokenizer(str(tmp_path), llama.TOKENIZER)
    assert_one_error(e, "tokenizer_config.json", "not an object")


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_weight_files_larger_than_memory_are_not_read(tmp_path, monkeypatch, kind):
    """A sparse file of 2^40 bytes, alone or as a shard, is refused unread."""
    single = tmp_path / (
        "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    )
    with open(single, "wb") as f:
        f.truncate(2**40)
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_weights(str(tmp_path))
    assert_one_error(e, str(single), "1,099.5 GB", "GB of memory")
    folder, index = sharded_folder(tmp_path, kind, f"shard.{kind}")
    write_shard(os.path.join(folder, f"shard.{kind}"), kind)
    monkeypatch.setattr(hf, "physical_memory", lambda: 50)  # Bytes.
    with pytest.raises(hf.HuggingFaceError) as e:
        hf.read_weights(folder)
    assert_one_error(e, f"the shards {index} names hold", "GB of memory")
