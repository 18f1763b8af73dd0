"""Hugging Face model folders in and out, whatever the model's family.

A folder holds `config.json`, the weights (`model.safetensors`,
`pytorch_model.bin`, or shards of either named in an index) and the
tokenizer's files. This module reads and writes them, fetches them from the
Hub, and maps tensors onto jaxgpt's parameters by a family's table (gpt2.py,
llama.py): rows of (HF tensor names, jaxgpt parameter path, transposed or
not). Every file is untrusted input: a damaged or hostile one ends in one
HuggingFaceError naming it, before anything large is read.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxgpt import tokenizer
from jaxgpt.hub import tokenizer_io
from jaxgpt.run.memory import physical_memory


class HuggingFaceError(ValueError):
    """A model folder, file or config jaxgpt cannot read (the message says why)."""


# ---------------------------------------------------------------- files


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict (zip format), without torch.

    Unpickles only what a state dict holds (an OrderedDict of tensors over
    storages); any other object is refused, so a file cannot run code. Every
    tensor's view (offset, size, stride) must lie inside its storage, and every
    storage's zip entry must hold exactly numel * itemsize bytes, which the
    archive can hold, before anything is read. The arrays are read-only views
    of their storages' bytes (the tensors of one storage share them).
    """
    if not zipfile.is_zipfile(path):
        raise HuggingFaceError(
            f"{path} is in torch's legacy (pre-1.6) format, which jaxgpt reads"
            " only with torch: convert it to model.safetensors, e.g. with"
            " transformers: GPT2LMHeadModel.from_pretrained(folder)"
            ".save_pretrained(folder)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if pkl is None:
                raise HuggingFaceError(
                    f"{path} has no data.pkl: not a torch.save'd state dict."
                )
            _check_entry(archive.getinfo(pkl), PICKLE_LIMIT, path)
            unpickler = _TorchUnpickler(archive, pkl[: -len("data.pkl")], path)
            return unpickler.tensors(unpickler.load())
    except HuggingFaceError:
        raise
    except Exception as e:  # noqa: BLE001 Damaged bytes fail in many ways.
        raise HuggingFaceError(
            f"{path} cannot be read ({type(e).__name__}: {_line(e)}): it is damaged;"
            " save the model again, as model.safetensors."
        ) from None


# torch storage classes -> numpy dtypes (those a float checkpoint may use).
TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(jax.numpy.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
}
PICKLE_LIMIT = 1 << 30  # data.pkl's largest declared size (a state dict's: KBs).
MAX_RATIO = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}  # Out / in, at most.
MAX_DIMS = 32  # numpy's limit is 64; a weight has at most a few.
MAX_EXTENT = 1 << 56  # The largest size or stride read (numpy's are 64-bit bytes).


def _check_entry(info: zipfile.ZipInfo, limit: int, path: str) -> None:
    """Refuses a zip entry whose declared size is over `limit` or more than its
    compressed bytes (inside the archive) can hold: a decompression bomb or a
    lying header."""
    most = MAX_RATIO.get(info.compress_type)
    if most is None:
        raise HuggingFaceError(
            f"{path}: entry {info.filename!r} uses zip compression method"
            f" {info.compress_type}, which torch.save never writes: the file is"
            " not a torch checkpoint."
        )
    archive_size = os.path.getsize(path)
    if (
        info.file_size > limit
        or info.compress_size > archive_size
        or info.file_size > most * info.compress_size + 1024 * (most > 1)
    ):
        raise HuggingFaceError(
            f"{path}: entry {info.filename!r} claims {info.file_size} bytes from"
            f" {info.compress_size} stored (the archive has {archive_size}, the most"
            f" it may hold is {limit}): the file is damaged or a decompression bomb."
        )


class _StorageType(NamedTuple):
    """A torch storage class, as named by the pickle (its dtype, if known)."""

    name: str
    dtype: np.dtype | None


class _Storage(NamedTuple):
    """A persistent id: ('storage', storage type, key, location, numel)."""

    type: Any
    key: Any
    numel: Any


class _Tensor(NamedTuple):
    """A tensor as the pickle describes it: a view of a storage (not yet read)."""

    storage: Any
    offset: Any
    size: Any
    stride: Any


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds torch tensors as numpy arrays from a torch.save zip archive."""

    def __init__(self, archive: zipfile.ZipFile, root: str, path: str):
        with archive.open(root + "data.pkl") as f:
            pkl = f.read(PICKLE_LIMIT)  # At most its declared size (checked).
        _check_memo(pkl, path)
        super().__init__(io.BytesIO(pkl))
        self.archive, self.root, self.path = archive, root, path
        self.storages: dict[str, bytes] = {}  # key -> the storage's bytes
        self.budget = physical_memory()  # Bytes the storages may still take.

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(f"torch.{name}", TORCH_STORAGE_DTYPES.get(name))
        raise HuggingFaceError(
            f"{self.path}: the checkpoint holds a {module}.{name}, not only tensors:"
            " convert it to model.safetensors."
        )

    def persistent_load(self, pid):  # ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise HuggingFaceError(
                f"{self.path}: the checkpoint holds a persistent object {_show(pid)},"
                " not a torch storage: it is damaged or not a state dict."
            )
        return _Storage(pid[1], pid[2], pid[4])

    def tensors(self, state_dict: Any) -> dict[str, np.ndarray]:
        """The arrays of an unpickled state dict, each view checked first."""
        if not isinstance(state_dict, dict):
            raise HuggingFaceError(
                f"{self.path} holds a {type(state_dict).__name__}, not a state dict"
                " (names -> tensors): save model.state_dict()."
            )
        out = {}
        for name, tensor in state_dict.items():
            if not isinstance(name, str) or not isinstance(tensor, _Tensor):
                raise HuggingFaceError(
                    f"{self.path}: entry {_show(name)} is a {type(tensor).__name__},"
                    " not a tensor: the file is not a state dict of tensors."
                )
            out[name] = self.array(name, tensor)
        return out

    def array(self, name: str, tensor: _Tensor) -> np.ndarray:
        """tensor's values: refused, naming it, unless its view lies inside its
        storage and the storage's entry holds exactly its bytes."""

        def bad(why: str) -> HuggingFaceError:
            return HuggingFaceError(
                f"{self.path}: tensor {_show(name)} {why}: the file is damaged; save the"
                " model again, as model.safetensors."
            )

        storage, offset, size, stride = tensor
        if not isinstance(storage, _Storage):
            raise bad(f"is a view of a {type(storage).__name__}, not a storage")
        kind, key, numel = storage
        if not isinstance(kind, _StorageType) or kind.dtype is None:
            known = ", ".join(f"torch.{k}" for k in TORCH_STORAGE_DTYPES)
            shown = kind.name if isinstance(kind, _StorageType) else _show(kind)
            raise bad(f"has storage type {shown}; jaxgpt reads {known}")
        dtype = kind.dtype
        if not _count(numel):
            raise bad(f"has a storage of {_show(numel)} elements")
        if not isinstance(key, str):
            raise bad(f"names storage {_show(key)}, not a storage key")
        try:
            info = self.archive.getinfo(f"{self.root}data/{key}")
        except KeyError:
            raise bad(f"names storage {_show(key)}, which the archive lacks") from None
        if info.file_size != numel * dtype.itemsize:
            raise bad(
                f"has a storage {_show(key)} of {_show(numel)} {dtype.name} elements"
                f" ({_show(numel * dtype.itemsize)} bytes), but its entry holds"
                f" {info.file_size} bytes"
            )
        if not (
            isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride) <= MAX_DIMS
            and all(map(_count, (offset, *size, *stride)))
            and max((*size, *stride), default=0) <= MAX_EXTENT
        ):
            raise bad(
                f"has offset {_show(offset)}, size {_show(size)} and stride"
                f" {_show(stride)}; they must be non-negative integers (sizes and"
                f" strides at most 2^56), one stride per dimension (at most"
                f" {MAX_DIMS})"
            )
        n = math.prod(size)
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if offset > numel or (n and last >= numel) or n > numel:
            raise bad(
                f"(offset {_show(offset)}, size {_show(size)}, stride"
                f" {_show(stride)}) reaches past its storage of {numel} elements"
                if n <= numel
                else f"has {_show(n)} elements, more than its storage's {numel}"
            )
        _check_entry(info, physical_memory(), self.path)
        raw = self.storages.get(key)
        if raw is None:
            self.budget -= info.file_size
            if self.budget < 0:
                raise bad(
                    f"needs storage {key!r}, and the storages up to it need more than"
                    f" this machine's {physical_memory() / 1e9:.1f} GB of memory"
                )
            try:
                with self.archive.open(info) as f:
                    raw = f.read(info.file_size)  # The declared size, and no more.
            except Exception as e:  # noqa: BLE001 A bad CRC, a broken stream...
                raise bad(
                    f"has a storage {key!r} that cannot be read ({_line(e)})"
                ) from None
            if len(raw) != info.file_size:
                raise bad(f"has a storage {key!r} shorter than its entry declares")
            self.storages[key] = raw
        strides = [s * dtype.itemsize for s in stride]
        data = np.frombuffer(raw, dtype)[offset:]
        # A read-only view, no copy: tensors of one storage take its bytes once.
        return np.lib.stride_tricks.as_strided(data, size, strides, writeable=False)


def _check_memo(pkl: bytes, path: str) -> None:
    """Refuses a pickle whose memo indices exceed its length (the C unpickler
    would grow its memo table to the index: gigabytes from a few bytes)."""
    for ops, (op, arg, _) in enumerate(pickletools.genops(pkl), 1):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) < ops:
            raise HuggingFaceError(
                f"{path}: data.pkl stores memo entry {_show(arg)} among {ops}"
                " opcodes: it is damaged; save the model again, as model.safetensors."
            )


def _show(x: Any, depth: int = 0) -> str:
    """A short repr of a value from a file (huge ints and deep tuples included)."""
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 64:
        return f"<a {x.bit_length()}-bit integer>"
    if isinstance(x, tuple) and len(x) <= 8 and depth < 3:
        return "(" + ", ".join(_show(v, depth + 1) for v in x) + ")"
    if isinstance(x, (int, float, str, type(None))):
        return repr(x[:40] if isinstance(x, str) else x)
    return f"<a {type(x).__name__}>"


def _line(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    return " ".join(str(e).split())[:300]


def _count(x: Any) -> bool:
    """x is a non-negative int (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _rebuild_tensor(storage, offset, size, stride, *_) -> _Tensor:
    """torch._utils._rebuild_tensor_v2's arguments, kept to be checked."""
    return _Tensor(storage, offset, size, stride)


JSON_LIMIT = 64 << 20  # config.json's and an index's largest size (theirs: KBs).
ST_INDEX = "model.safetensors.index.json"  # Sharded checkpoints' tables of contents.
BIN_INDEX = "pytorch_model.bin.index.json"


def read_json(path: str) -> Any:
    """A small JSON file of a model folder (config.json, an index), refused in
    one line if it is too big or not JSON."""
    if os.path.getsize(path) > JSON_LIMIT:
        raise HuggingFaceError(
            f"{path} has {os.path.getsize(path)} bytes, more than such a file's"
            f" {JSON_LIMIT} at most: it is not a Hugging Face model's."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HuggingFaceError(f"{path} is not JSON ({_line(e)}).") from None


def size_fields(c: Mapping[str, Any], defaults: Mapping[str, int], path: str) -> dict:
    """config.json's sizes (defaults where absent), each a positive integer."""
    sizes = {}
    for key, default in defaults.items():
        value = c.get(key)
        value = default if value is None else value
        if not _count(value) or value == 0:
            raise HuggingFaceError(
                f"{path} has {key}={_show(value)}: it must be a positive integer."
            )
        sizes[key] = value
    return sizes


def check_fits_memory(n_params: int, path: str) -> None:
    """Refuses, before anything is allocated, a model whose float32 parameters
    (4 bytes each) cannot fit in this machine's physical memory."""
    need, have = 4 * n_params, physical_memory()
    if need > have:
        gb = f"{need / 1e9:,.1f}" if need < 10**18 else f"10^{math.log10(need) - 9:.0f}"
        raise HuggingFaceError(
            f"{path} describes a model of about {gb} GB in float32 (4 bytes a"
            f" parameter), more than this machine's {have / 1e9:.1f} GB of memory:"
            " check its sizes (n_layer, n_embd, vocab_size...)."
        )


def in_folder(folder: str, name: Any, index: str) -> str:
    """The path of the shard `index` names, refused unless it is a bare file
    name whose file (symlinks followed) lies in `folder`, or in the blobs of the
    Hub cache's repository when `folder` is one of its snapshots."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or (os.path.basename(name) != name)
    ):
        raise HuggingFaceError(
            f"{index} names shard {_show(name)}, which is not a file name in"
            f" {folder}: refused (a shard must lie in the model's folder)."
        )
    path = os.path.join(folder, name)
    real, roots = os.path.realpath(path), [os.path.realpath(folder)]
    if os.path.basename(os.path.dirname(roots[0])) == "snapshots":  # The Hub's.
        roots.append(os.path.join(os.path.dirname(os.path.dirname(roots[0])), "blobs"))
    if not any(os.path.dirname(real) == root for root in roots):
        raise HuggingFaceError(
            f"{index} names shard {name!r}, which links to {real}, outside {folder}:"
            " refused (a shard must lie in the model's folder)."
        )
    if not os.path.isfile(path):
        raise HuggingFaceError(f"{index} names shard {name!r}, not in {folder}.")
    return path


def read_shards(
    folder: str, index_name: str, read_one: Callable[[str], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The tensors of the shards a sharded checkpoint's index names, each read
    with `read_one` (every shard checked to lie in `folder` first)."""
    index = os.path.join(folder, index_name)
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise HuggingFaceError(
            f"{index} has no weight_map of tensor names to shard files: it is"
            " damaged; save the model again (save_pretrained)."
        )
    shards = [in_folder(folder, s, index) for s in sorted(set(weight_map.values()))]
    check_weights_fit(shards, f"the shards {index} names")
    tensors = {}
    for path in shards:
        tensors.update(read_one(path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise HuggingFaceError(
            f"tensor {missing[0]!r} is not in the shard {index} names for it."
        )
    return tensors


def check_weights_fit(paths: list[str], what: str) -> None:
    """Refuses weight files larger together than this machine's memory (a
    sparse file can claim terabytes) before any is read."""
    total, have = sum(os.path.getsize(p) for p in paths), physical_memory()
    if total > have:
        raise HuggingFaceError(
            f"{what} hold {total / 1e9:,.1f} GB, more than this machine's"
            f" {have / 1e9:.1f} GB of memory."
        )


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file as numpy arrays (bfloat16 included),
    read through the safetensors library, which checks its header."""
    try:
        with safetensors.safe_open(path, framework="flax") as f:
            return {name: np.asarray(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 SafetensorError, or a dtype numpy lacks.
        raise HuggingFaceError(
            f"{path} cannot be read ({_line(e)}): it is damaged or not a safetensors"
            " file; save the model again (save_pretrained)."
        ) from None


def read_weights(folder: str) -> dict[str, np.ndarray]:
    """The tensors of a model folder: model.safetensors, pytorch_model.bin, or
    the shards one of their indexes names."""
    st_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st_path):
        check_weights_fit([st_path], st_path)
        return read_safetensors(st_path)
    if os.path.isfile(bin_path):
        check_weights_fit([bin_path], bin_path)
        return read_torch_state_dict(bin_path)
    if os.path.isfile(os.path.join(folder, ST_INDEX)):
        return read_shards(folder, ST_INDEX, read_safetensors)
    if os.path.isfile(os.path.join(folder, BIN_INDEX)):
        return read_shards(folder, BIN_INDEX, read_torch_state_dict)
    raise HuggingFaceError(
        f"{folder} has neither model.safetensors nor pytorch_model.bin (nor"
        f" {ST_INDEX} or {BIN_INDEX} naming shards of them)."
    )


def read_config(folder: str) -> dict[str, Any]:
    """A folder's config.json, refused unless it is a small JSON object."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise HuggingFaceError(f"{folder} has no config.json: not a HF model folder.")
    config_json = read_json(path)
    if not isinstance(config_json, dict):
        raise HuggingFaceError(
            f"{path} is a JSON {type(config_json).__name__}, not a model's config"
            " object."
        )
    return config_json


# ---------------------------------------------------------------- the Hub

# What a download fetches: the config, the weights and the tokenizer's files.
HUB_FILES = [
    "config.json",
    "model.safetensors",
    ST_INDEX,
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def fetch(name_or_path: str, names: Mapping[str, str]) -> str:
    """The local folder of `name_or_path`: a folder as it is, else a Hub
    repository (owner/name, or a short name `names` maps to one) downloaded
    into the Hub's cache (or found there offline)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    repo = names.get(name_or_path)
    if repo is None and REPO_ID.fullmatch(name_or_path):
        repo = None if os.path.exists(name_or_path) else name_or_path
    if repo is None:
        raise HuggingFaceError(
            f"{name_or_path!r} is neither a folder, a Hugging Face Hub repository"
            f" (owner/name), nor one of {', '.join(names)}."
        )
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=HUB_FILES)
    except (OSError, ValueError, huggingface_hub.errors.HfHubHTTPError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HuggingFaceError(
            f"{name_or_path!r} is no folder here, and the Hugging Face Hub could not"
            f" give {repo} ({reason}): offline, pass a local folder with config.json,"
            " model.safetensors and the tokenizer's files instead (e.g. made by"
            f" `hf download {repo}` on a machine online)."
        ) from e


# ---------------------------------------------------------------- the tables


class Row(NamedTuple):
    """HF tensors (concatenated in this order) and the jaxgpt parameter they
    make; `linear`: torch nn.Linear weights ([out, in]), each transposed into
    Flax's [in, out] and concatenated along out."""

    hf_names: tuple[str, ...]
    path: tuple[str, ...]
    linear: bool = False


class Table(NamedTuple):
    """How one model's HF tensors map onto jaxgpt's parameters."""

    model: str  # The HF class, e.g. "LlamaForCausalLM"; and its config:
    describe: str  # "n_layer=2, n_embd=64, ...", for the errors.
    shapes: dict[str, tuple[int, ...]]  # Every tensor of the HF model.
    rows: list[Row]  # Those that are parameters of jaxgpt's model.
    fixed: dict[str, tuple[float, str]]  # The others: (value, why jaxgpt lacks it).
    tied: tuple[str, str] | None  # (head, embedding): a stored head must equal it.


def expand(
    rows: Sequence[tuple[Any, str, Any]], n_layer: int, dims: Mapping[str, int]
) -> list[tuple[tuple[str, ...], tuple[str, ...], list[tuple[int, ...]]]]:
    """A family's table rows (HF name or names, jaxgpt path, shape or shapes as
    dimension names, e.g. "C 3C") as (names, path, shapes), with "{i}" filled for
    each layer: the rows before the layers', each layer's rows in turn, the rest."""
    one = lambda x: (x,) if isinstance(x, str) else tuple(x)
    layered = ["{i}" in row[1] for row in rows]
    first, last = layered.index(True), len(rows) - layered[::-1].index(True)
    out = []
    for i, (names, path, shapes) in [
        *((0, row) for row in rows[:first]),
        *((i, row) for i in range(n_layer) for row in rows[first:last]),
        *((0, row) for row in rows[last:]),
    ]:
        out.append((
            tuple(n.format(i=i) for n in one(names)),
            tuple(path.format(i=i).split("/")),
            [tuple(dims[d] for d in shape.split()) for shape in one(shapes)],
        ))  # fmt: skip
    return out


def check_options(checks: Iterable[tuple[str, Any, Any]]) -> None:
    """Refuses the first config.json option (name, value jaxgpt computes,
    value in the file) that jaxgpt's GPT cannot compute."""
    for option, supported, value in checks:
        if value != supported:
            raise HuggingFaceError(
                f"config.json has {option}={value!r}, which jaxgpt's GPT cannot"
                f" compute (it needs {option}={supported!r})."
            )


def check_tensors(tensors: Mapping[str, Any], table: Table) -> None:
    """Every tensor of the table's model is there with its shape, and nothing
    else (a tied head aside)."""
    for name, shape in table.shapes.items():
        if name not in tensors:
            raise HuggingFaceError(
                f"tensor {name!r} {list(shape)} is missing: not the {table.model}"
                f" that the config describes ({table.describe})."
            )
        if tuple(tensors[name].shape) != shape:
            raise HuggingFaceError(
                f"tensor {name!r} has shape {list(tensors[name].shape)}, but the"
                f" config ({table.describe}) gives {list(shape)}."
            )
    extra = {table.tied[0]} if table.tied else set()
    unexpected = sorted(set(tensors) - set(table.shapes) - extra)
    if unexpected:
        raise HuggingFaceError(
            f"unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more):"
            f" not a {table.model} checkpoint."
        )


def params_from_hf(
    tensors: Mapping[str, Any], table: Table, scan_layers: bool = False
) -> dict[str, Any]:
    """jaxgpt parameters (float32; stacked if scan_layers) from HF tensors,
    each checked against the table first."""
    check_tensors(tensors, table)
    f32 = lambda name: np.asarray(tensors[name], dtype=np.float32)
    if table.tied and table.tied[0] in tensors:
        head, embedding = table.tied
        if not np.array_equal(f32(head), f32(embedding)):
            raise HuggingFaceError(
                f"tensor {head!r} differs from {embedding!r}, but the output layer"
                " is tied to the token embedding (tie_word_embeddings=true): the"
                " model cannot hold another (set tie_word_embeddings to false)."
            )
    for name, (value, why) in table.fixed.items():
        if not np.all(f32(name) == value):
            raise HuggingFaceError(f"tensor {name!r} is not all {value:g}s, but {why}.")
    params: dict[str, Any] = {}
    for names, path, linear in table.rows:
        parts = [f32(n).T if linear else f32(n) for n in names]
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(np.concatenate(parts, axis=int(linear)))
    return stack_blocks(params) if scan_layers else params


def params_to_hf(
    params: Mapping[str, Any], table: Table, scan_layers: bool = False
) -> dict[str, np.ndarray]:
    """HF tensors (float32, contiguous) from jaxgpt parameters: the table's rows
    split back, and its fixed tensors written as their values (the same
    function)."""
    if scan_layers:
        params = unstack_blocks(params)
    tensors = {
        name: np.full(table.shapes[name], value, np.float32)
        for name, (value, _) in table.fixed.items()
    }
    for names, path, linear in table.rows:
        node = params
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            raise HuggingFaceError(
                f"parameter {'/'.join(path)} is missing: the parameters are not"
                " those of this ModelConfig."
            )
        sizes = [table.shapes[n][0] for n in names]
        parts = np.split(np.asarray(node), np.cumsum(sizes)[:-1], axis=int(linear))
        for name, part in zip(names, parts):
            tensors[name] = part.T if linear else part
    tensors = {
        name: np.ascontiguousarray(tensors[name], dtype=np.float32)
        for name in table.shapes
        if name in tensors
    }
    try:
        check_tensors(tensors, table)
    except HuggingFaceError as e:
        raise HuggingFaceError(
            f"the parameters are not those of this ModelConfig: {e}"
        ) from None
    return tensors


def write_folder(
    out_dir: str,
    config_json: dict[str, Any],
    tensors: dict[str, np.ndarray],
    tokenizer_files: Mapping[str, bytes | str] | None = None,
) -> None:
    """config.json, model.safetensors and the tokenizer's files into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)
    weights = os.path.join(out_dir, "model.safetensors")
    safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    # safetensors (0.8) writes a private temporary file (mode 0600) and renames
    # it: give the weights the mode of the folder's other files.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)
    for name, contents in (tokenizer_files or {}).items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise HuggingFaceError(f"tokenizer file name {name!r} must be a bare name.")
        mode = "wb" if isinstance(contents, bytes) else "w"
        with open(os.path.join(out_dir, name), mode) as f:
            f.write(contents)


# ---------------------------------------------------------------- tokenizers

TOKENIZER_JSON = "jaxgpt_tokenizer.json"  # jaxgpt's own tokenizers, in an export.
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's BPE, and nanoGPT's padding of it.


def load_tokenizer(folder: str, kinds: Iterable[str], vocab_size: int | None = None):
    """A model folder's tokenizer: jaxgpt's own if an export wrote one, else the
    first of `kinds` the folder holds: "vocab.json" (GPT-2-style vocab.json and
    merges.txt, named "gpt2" when they are GPT-2's) or "tokenizer.json" (Hugging
    Face tokenizers', with tokenizer_config.json's named special tokens and the
    folder's chat template); else GPT-2's own if `vocab_size` is GPT-2's."""
    own = os.path.join(folder, TOKENIZER_JSON)
    if os.path.isfile(own):
        return tokenizer_io.from_json(read_json(own))
    kinds = tuple(kinds)
    for kind in kinds:
        if not os.path.isfile(os.path.join(folder, kind)):
            continue
        if kind == "vocab.json":
            files = (os.path.join(folder, f) for f in ("vocab.json", "merges.txt"))
            found, gpt2 = tokenizer_io.load_gpt2_files(*files), tokenizer_io.load_gpt2()
            return gpt2 if found == gpt2.bpe else tokenizer_io.BPETokenizer(found)
        config = tokenizer_config(folder)
        return tokenizer_io.HFTokenizer(
            read_json(os.path.join(folder, kind)),
            special_tokens=tokenizer_io.named_tokens(config),
            chat_template=tokenizer_io.chat_template_of(folder, config),
        )
    if vocab_size in GPT2_VOCAB_SIZES:
        return tokenizer_io.load_gpt2()
    raise HuggingFaceError(
        f"{folder} has no tokenizer ({', '.join(kinds)} or {TOKENIZER_JSON})"
        + (
            f" and its vocabulary of {vocab_size} is not GPT-2's."
            if vocab_size
            else "."
        )
    )


def tokenizer_config(folder: str) -> dict[str, Any]:
    """A folder's tokenizer_config.json ({} if it has none)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise HuggingFaceError(
            f"{path} is a JSON {type(config).__name__}, not an object."
        )
    return config


def tokenizer_files(tok) -> tuple[dict[str, str], str]:
    """The files that store `tok` in an export folder, and one line saying how."""
    if tok.name == tokenizer_io.HFTokenizer.name:  # A Llama-family model's own.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tok.special_tokens}
        how = "Hugging Face tokenizers' tokenizer.json (transformers reads it)"
        if tok.chat_template is not None:
            config["chat_template"] = tok.chat_template
            how += ", its chat template in tokenizer_config.json"
        files = {
            "tokenizer.json": json.dumps(tok.json, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False),
        }
        return files, how
    base = tok.base if tok.name == tokenizer_io.ChatTokenizer.name else tok
    if base.name == "gpt2":
        files = tokenizer_io.to_hf_files(base.bpe)
        config = {"tokenizer_class": "GPT2Tokenizer", **dict.fromkeys(
            ("bos_token", "eos_token", "unk_token"), tokenizer.ENDOFTEXT)}  # fmt: skip
        how = "GPT-2's tokenizer: vocab.json and merges.txt (transformers reads them)"
        if tok is not base:  # The chat tokens: added tokens, and their template.
            config["added_tokens_decoder"] = {
                str(i): {"content": text, "special": True, "lstrip": False,
                         "rstrip": False, "normalized": False, "single_word": False}
                for text, i in sorted(tok.special.items(), key=lambda kv: kv[1])
            }  # fmt: skip
            config["chat_template"] = tokenizer_io.CHAT_JINJA
            files[TOKENIZER_JSON] = json.dumps(tok.to_json())  # jaxgpt reads this.
            how += (
                f", the chat tokens added and their chat template in"
                f" tokenizer_config.json; {TOKENIZER_JSON} for jaxgpt"
            )
        files["tokenizer_config.json"] = json.dumps(config)
        return files, how
    files = {TOKENIZER_JSON: json.dumps(tok.to_json())}
    return files, (
        f"jaxgpt's own {tok.name} tokenizer: {TOKENIZER_JSON} (transformers cannot"
        " read it; jaxgpt.hub.tokenizer_io.from_json does)"
    )


# ---------------------------------------------------------------- layers


def stack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """Plain parameters (blocks h_0 ... h_{L-1}) -> scan_layers ones (h, stacked on L).

    Works on any tree shaped like the parameters (gradients, Adam moments).
    """
    names = sorted((k for k in params if k.startswith("h_")), key=lambda k: int(k[2:]))
    if not names:
        raise ValueError("no blocks h_0 ... h_{L-1} to stack (already stacked?).")
    rest = {k: v for k, v in params.items() if k not in names}
    blocks = [params[k] for k in names]
    return {**rest, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """scan_layers parameters (h, stacked on L) -> plain ones (h_0 ... h_{L-1})."""
    if "h" not in params:
        raise ValueError("no stacked blocks 'h' to unstack (already plain?).")
    rest = {k: v for k, v in params.items() if k != "h"}
    L = jax.tree.leaves(params["h"])[0].shape[0]
    blocks = {
        f"h_{i}": jax.tree.map(lambda x, i=i: x[i], params["h"]) for i in range(L)
    }
    return {**rest, **blocks}
