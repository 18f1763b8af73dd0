"""GPT-2 weights in from and out to Hugging Face's layout (no torch needed).

Hugging Face keeps a GPT-2 as a folder: `config.json` (a GPT2Config) and
`model.safetensors` (older ones: `pytorch_model.bin`). The tensors map one to
one onto jaxgpt's parameters (L layers, C = n_embd):

    HF tensor (optional "transformer." prefix)  jaxgpt parameter      shape
    wte.weight                                  wte/embedding         [V, C]
    wpe.weight                                  wpe/embedding         [T, C]
    h.{i}.ln_1.weight / .bias                   h_{i}/ln_1/scale|bias [C]
    h.{i}.attn.c_attn.weight / .bias            h_{i}/attn/c_attn/... [C, 3C] / [3C]
    h.{i}.attn.c_proj.weight / .bias            h_{i}/attn/c_proj/... [C, C] / [C]
    h.{i}.ln_2.weight / .bias                   h_{i}/ln_2/scale|bias [C]
    h.{i}.mlp.c_fc.weight / .bias               h_{i}/mlp/c_fc/...    [C, 4C] / [4C]
    h.{i}.mlp.c_proj.weight / .bias             h_{i}/mlp/c_proj/...  [4C, C] / [C]
    ln_f.weight / .bias                         ln_f/scale|bias       [C]

- GPT-2's projections are `Conv1D` layers whose weight is [in, out], the
  orientation of a Flax Dense kernel, so no matrix is transposed (a torch
  `nn.Linear` would be [out, in]). c_attn's 3C outputs are q, k, v in turn,
  each H heads of D columns: the split CausalSelfAttention does.
- `h.{i}.attn.bias` and `h.{i}.attn.masked_bias` are the causal-mask buffers
  some checkpoints carry; they are not parameters and are skipped.
- The output layer is tied to wte (jaxgpt's logits are wte.attend), so a
  `lm_head.weight` is not stored; if a file has one it must equal wte.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxgpt import tokenizer
from jaxgpt.config import RUNTIME_FIELDS, ModelConfig
from jaxgpt.hub import tokenizer_io

# The released GPT-2 sizes and the Hub repositories that hold them.
HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's BPE, and nanoGPT's padding of it.
GPT2_EOS = 50256  # <|endoftext|>, GPT-2's bos and eos token.
PREFIX = "transformer."  # GPT2LMHeadModel's name for its GPT2Model.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class HuggingFaceError(ValueError):
    """A GPT-2 folder, file or config jaxgpt cannot read (the message says why)."""


# ---------------------------------------------------------------- config.json


def config_from_hf(config_json: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT2Config (as read from config.json).

    Refuses the GPT2Config options jaxgpt's GPT cannot compute. dropout is 0
    (inference); pass another with dataclasses.replace to fine-tune.
    """
    c = config_json
    n_embd = c.get("n_embd", 768)
    # (option, value jaxgpt computes, value in this config); absent = HF default.
    checks = [
        ("model_type", "gpt2", c.get("model_type", "gpt2")),
        ("layer_norm_epsilon", 1e-5, c.get("layer_norm_epsilon", 1e-5)),
        ("tie_word_embeddings", True, c.get("tie_word_embeddings", True)),
        ("n_inner", 4 * n_embd, c.get("n_inner") or 4 * n_embd),
        ("scale_attn_weights", True, c.get("scale_attn_weights", True)),
        (
            "scale_attn_by_inverse_layer_idx",
            False,
            c.get("scale_attn_by_inverse_layer_idx", False),
        ),
        ("reorder_and_upcast_attn", False, c.get("reorder_and_upcast_attn", False)),
        ("add_cross_attention", False, c.get("add_cross_attention", False)),
    ]
    for option, supported, value in checks:
        if value != supported:
            raise HuggingFaceError(
                f"config.json has {option}={value!r}, which jaxgpt's GPT cannot"
                f" compute (it needs {option}={supported!r})."
            )
    activation = c.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):  # Both: tanh GELU.
        raise HuggingFaceError(
            f"config.json has activation_function={activation!r}; jaxgpt's GPT"
            " computes GPT-2's tanh GELU ('gelu_new' or 'gelu_pytorch_tanh') only."
        )
    return ModelConfig(
        vocab_size=c.get("vocab_size", 50257),
        block_size=c.get("n_positions", 1024),
        n_layer=c.get("n_layer", 12),
        n_head=c.get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,
        bias=True,  # GPT-2 has biases in every Dense and LayerNorm.
        model="gpt",
        scan_layers=False,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for `cfg`: a GPT2Config that transformers loads."""
    gpt2_vocab = cfg.vocab_size in GPT2_VOCAB_SIZES  # Else no token id is known.
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd.
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": GPT2_EOS if gpt2_vocab else None,
        "eos_token_id": GPT2_EOS if gpt2_vocab else None,
    }


# ------------------------------------------------------------------- tensors


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 with `cfg`'s shapes, by HF name (no prefix)."""
    V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(cfg.n_layer):
        for name, n_in, n_out in (
            ("attn.c_attn", C, 3 * C),
            ("attn.c_proj", C, C),
            ("mlp.c_fc", C, 4 * C),
            ("mlp.c_proj", 4 * C, C),
        ):
            shapes[f"h.{i}.{name}.weight"] = (n_in, n_out)  # Conv1D: [in, out].
            shapes[f"h.{i}.{name}.bias"] = (n_out,)
        for ln in ("ln_1", "ln_2"):
            shapes[f"h.{i}.{ln}.weight"] = shapes[f"h.{i}.{ln}.bias"] = (C,)
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (C,)
    return shapes


def _jax_path(hf_name: str) -> tuple[str, ...]:
    """'h.3.mlp.c_fc.weight' -> ('h_3', 'mlp', 'c_fc', 'kernel'), and so on."""
    *module, leaf = hf_name.split(".")
    if module[0] == "h":  # h.{i}.rest -> h_{i}/rest
        module = [f"h_{module[1]}", *module[2:]]
    if module[-1] in ("wte", "wpe"):
        leaf = "embedding"
    elif module[-1].startswith("ln_"):
        leaf = {"weight": "scale", "bias": "bias"}[leaf]
    else:
        leaf = {"weight": "kernel", "bias": "bias"}[leaf]
    return (*module, leaf)


def _strip_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the 'transformer.' prefix and the attention-mask buffers."""
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if MASK_BUFFER.fullmatch(name):
            continue  # A causal-mask buffer, not a parameter.
        if name in out:
            raise HuggingFaceError(
                f"tensor {name!r} appears both with and without the"
                f" {PREFIX!r} prefix: the file holds two models."
            )
        out[name] = value
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """jaxgpt parameters (float32; stacked if cfg.scan_layers) from HF tensors.

    Checks that every tensor of a GPT-2 with `cfg` is there with its shape and
    that nothing else is. With cfg.bias=False every bias must be zero (as
    save_gpt2 writes them for such a model).
    """
    tensors = _strip_names(tensors)
    shapes = hf_shapes(cfg)
    lm_head = tensors.pop("lm_head.weight", None)
    for name, shape in shapes.items():
        if name not in tensors:
            raise HuggingFaceError(
                f"tensor {name!r} {list(shape)} is missing: not the GPT-2 that"
                f" the config describes (n_layer={cfg.n_layer}, n_embd={cfg.n_embd},"
                f" vocab_size={cfg.vocab_size}, n_positions={cfg.block_size})."
            )
        if tuple(tensors[name].shape) != shape:
            raise HuggingFaceError(
                f"tensor {name!r} has shape {list(tensors[name].shape)}, but"
                f" the config (n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size},"
                f" n_positions={cfg.block_size}) gives {list(shape)}."
            )
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise HuggingFaceError(
            f"unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more):"
            " not a GPT2Model / GPT2LMHeadModel checkpoint."
        )
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise HuggingFaceError(
            "tensor 'lm_head.weight' differs from 'wte.weight': jaxgpt's output"
            " layer is tied to the token embedding and cannot hold another."
        )
    params: dict[str, Any] = {}
    for name in shapes:
        path = _jax_path(name)
        value = np.asarray(tensors[name], dtype=np.float32)
        if path[-1] == "bias" and not cfg.bias:
            if np.any(value):
                raise HuggingFaceError(
                    f"tensor {name!r} is not zero, but the model has bias=False:"
                    " load it with bias=True."
                )
            continue
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jax.numpy.asarray(value)
    return stack_blocks(params) if cfg.scan_layers else params


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors (GPT2LMHeadModel's names, float32) from jaxgpt parameters.

    A bias=False model's biases are written as zeros, since HF's GPT-2 always
    has them (so it computes the same function); scan_layers params are
    unstacked first.
    """
    if cfg.scan_layers:
        params = unstack_blocks(params)
    tensors = {}
    for name, shape in hf_shapes(cfg).items():
        node = params
        for part in _jax_path(name):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None and name.endswith(".bias") and not cfg.bias:
            node = np.zeros(shape, np.float32)
        if node is None or tuple(node.shape) != shape:
            raise HuggingFaceError(
                f"parameter {'/'.join(_jax_path(name))} is missing or not"
                f" {list(shape)}: the parameters are not those of this ModelConfig."
            )
        tensors[PREFIX + name] = np.ascontiguousarray(node, dtype=np.float32)
    return tensors


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


def physical_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def gpt2_params(c: Mapping[str, Any], path: str) -> int:
    """The parameter count of the GPT2Config `c` (refused unless its sizes are
    positive integers)."""
    s = size_fields(
        c,
        {"vocab_size": 50257, "n_positions": 1024, "n_layer": 12, "n_embd": 768},
        path,
    )
    V, T, L, C = s["vocab_size"], s["n_positions"], s["n_layer"], s["n_embd"]
    return (V + T) * C + L * (12 * C * C + 13 * C) + 2 * C


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


def read_hf_folder(folder: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json and the tensors of a GPT-2 folder in Hugging Face's layout
    (the config's sizes checked to fit in memory before any tensor is read)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise HuggingFaceError(f"{folder} has no config.json: not a HF model folder.")
    config_json = read_json(config_path)
    if not isinstance(config_json, dict):
        raise HuggingFaceError(
            f"{config_path} is a JSON {type(config_json).__name__}, not a GPT2Config"
            " object."
        )
    check_fits_memory(gpt2_params(config_json, config_path), config_path)
    return config_json, read_weights(folder)


def download_gpt2(name: str) -> str:
    """The local folder of a released GPT-2 (the Hub's cache, filled if online)."""
    try:
        return huggingface_hub.snapshot_download(
            HUB_REPOS[name], allow_patterns=["config.json", "model.safetensors"]
        )
    except (OSError, huggingface_hub.errors.HfHubHTTPError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HuggingFaceError(
            f"could not download {name!r} from the Hugging Face Hub ({reason}):"
            " offline, pass a local folder with config.json and model.safetensors"
            f" instead (e.g. `hf download {HUB_REPOS[name]}` on a machine online)."
        ) from e


def load_gpt2(name_or_path: str, **overrides: Any) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a GPT-2: a released size or a local HF folder.

    name_or_path: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (downloaded
    once into the Hub's cache), or a folder with config.json and
    model.safetensors (or a zip-format pytorch_model.bin). overrides set the
    ModelConfig fields config.json leaves open (dropout, dtype, remat,
    scan_layers, attention).
    """
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise HuggingFaceError(
            f"load_gpt2 cannot override {bad[0]!r}: config.json fixes it"
            f" (only {', '.join(RUNTIME_FIELDS)} may be set)."
        )
    if os.path.isdir(name_or_path):
        folder = name_or_path
    elif name_or_path in HUB_REPOS:
        folder = download_gpt2(name_or_path)
    else:
        raise HuggingFaceError(
            f"{name_or_path!r} is neither a folder nor one of {', '.join(HUB_REPOS)}."
        )
    config_json, tensors = read_hf_folder(folder)
    try:
        cfg = config_from_hf(config_json)
    except TypeError as e:  # A value of the wrong type (a string for a size...).
        raise HuggingFaceError(
            f"{os.path.join(folder, 'config.json')} is not a GPT2Config ({e})."
        ) from None
    cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    return cfg, params_from_hf(tensors, cfg)


def save_gpt2(
    params: dict[str, Any],
    cfg: ModelConfig,
    out_dir: str,
    tokenizer_files: dict[str, bytes | str] | None = None,
) -> None:
    """Writes a folder that transformers' GPT2LMHeadModel.from_pretrained loads.

    config.json and model.safetensors, plus `tokenizer_files` (file name ->
    contents) as given. HF's GPT-2 always has biases: a bias=False model's are
    written as zeros, which computes the same function. bos/eos are GPT-2's
    <|endoftext|> when the vocabulary has GPT-2's size, else unset.
    """
    if cfg.model != "gpt":
        raise HuggingFaceError(f"only a GPT exports to GPT-2, not a {cfg.model!r}.")
    choices = cfg.architecture_choices()  # Options GPT-2's layout has no room for.
    if choices:
        name, value = next(iter(choices.items()))
        raise HuggingFaceError(
            f"the model has --{name}={value}, which GPT-2's layout cannot hold"
            " (learned positions, LayerNorm, GELU 4C, one key/value head per head,"
            " tied head): export it with --format=llama if Llama's can."
        )
    write_folder(out_dir, config_to_hf(cfg), params_to_hf(params, cfg), tokenizer_files)


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


def load_tokenizer(name_or_path: str, vocab_size: int):
    """The tokenizer of a GPT-2 that load_gpt2 reads (its vocab_size given).

    GPT-2's own for the released sizes; in a folder, jaxgpt's JSON if an export
    wrote one, else vocab.json + merges.txt (named "gpt2" when they are
    GPT-2's), else GPT-2's own if the vocabulary has its size.
    """
    folder = Path(name_or_path)
    if folder.is_dir() and (folder / TOKENIZER_JSON).is_file():
        return tokenizer_io.from_json(json.loads((folder / TOKENIZER_JSON).read_text()))
    if folder.is_dir() and (folder / "vocab.json").is_file():
        files = (folder / "vocab.json", folder / "merges.txt")
        found = tokenizer_io.load_gpt2_files(*files)
        gpt2 = tokenizer_io.load_gpt2()
        if found == gpt2.bpe:
            return gpt2
        return tokenizer.BPETokenizer(found)
    if vocab_size in GPT2_VOCAB_SIZES:
        return tokenizer_io.load_gpt2()
    raise HuggingFaceError(
        f"{name_or_path} has no tokenizer (vocab.json + merges.txt, or"
        f" {TOKENIZER_JSON}) and its vocabulary of {vocab_size} is not GPT-2's."
    )


def tokenizer_files(tok) -> tuple[dict[str, str], str]:
    """The files that store `tok` in an export folder, and one line saying how."""
    if tok.name == tokenizer_io.HFTokenizer.name:  # A Llama-family model's own.
        specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({k: v for k, v in specials.items() if v is not None})
        files = {
            "tokenizer.json": json.dumps(tok.json, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config),
        }
        return files, "Hugging Face tokenizers' tokenizer.json (transformers reads it)"
    if tok.name == "gpt2":
        files = tokenizer_io.to_hf_files(tok.bpe)
        files["tokenizer_config.json"] = json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", **dict.fromkeys(
                ("bos_token", "eos_token", "unk_token"), tokenizer.ENDOFTEXT)}
        )  # fmt: skip
        return (
            files,
            "GPT-2's tokenizer: vocab.json and merges.txt (transformers reads them)",
        )
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
