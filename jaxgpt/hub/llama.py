"""Llama-family weights in from and out to Hugging Face's layout (no torch needed).

Hugging Face keeps a `LlamaForCausalLM` (SmolLM2, TinyLlama, Llama 3.2 ...) as
a folder: `config.json` (a LlamaConfig), `model.safetensors` or shards named
in `model.safetensors.index.json`, and `tokenizer.json`. jaxgpt's GPT holds
such a model with --position=rope, --norm=rmsnorm, --mlp=swiglu and no bias:
the tensors map onto its parameters as follows (L layers, C = hidden_size,
H query and K key/value heads of D = C / H channels, F = intermediate_size):

    HF tensor ("model." prefix but lm_head)   jaxgpt parameter          shape
    embed_tokens.weight                       wte/embedding             [V, C]
    layers.{i}.input_layernorm.weight         h_{i}/ln_1/scale          [C]
    layers.{i}.self_attn.q_proj.weight  [HD, C] \\
    layers.{i}.self_attn.k_proj.weight  [KD, C]  > h_{i}/attn/c_attn/kernel
    layers.{i}.self_attn.v_proj.weight  [KD, C] /   [C, (H + 2K) D]: q | k | v
    layers.{i}.self_attn.o_proj.weight        h_{i}/attn/c_proj/kernel  [C, C]
    layers.{i}.post_attention_layernorm.weight  h_{i}/ln_2/scale        [C]
    layers.{i}.mlp.gate_proj.weight     [F, C] \\ h_{i}/mlp/c_fc/kernel
    layers.{i}.mlp.up_proj.weight       [F, C] /   [C, 2F]: gate | up
    layers.{i}.mlp.down_proj.weight           h_{i}/mlp/c_proj/kernel   [F, C]
    norm.weight                               ln_f/scale                [C]
    lm_head.weight (untied only)              lm_head/kernel            [C, V]

- Every projection is a torch `nn.Linear`, whose weight is [out, in]: each is
  transposed into Flax's [in, out] kernel (the embedding is [V, C] in both).
  With attention_bias and mlp_bias (both or neither: --bias), each
  projection's `.bias` maps to the kernel's bias the same way.
- Rotary embeddings: HF's Llama turns channel i with channel i + D/2
  ("rotate_half"), the layout model.rope computes, so q_proj and k_proj are
  taken as they are. (Meta's original checkpoints pair channels 2i and
  2i + 1; HF's conversion script permutes the rows of q_proj and k_proj into
  halves, so every HF folder is in this layout already.) The base is
  rope_parameters["rope_theta"] (transformers 5; older files: rope_theta);
  only the default rope_type (no scaling, as SmolLM2 and TinyLlama) is computed.
- RMSNorm: rms_norm_eps is --norm_eps; HF normalises in float32 and then
  multiplies by its weight, as flax's RMSNorm does.
- Grouped-query attention: num_key_value_heads is --n_kv_head; HF's repeat_kv
  gives query head h the key/value head h // (H / K), as model.py does.
- The output layer: tie_word_embeddings (Llama's default: False) is
  --tie_embeddings; a tied file's lm_head.weight, if stored, must equal
  embed_tokens.weight.
- Files may store bfloat16 or float16; jaxgpt's parameters are float32.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import huggingface_hub
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import RUNTIME_FIELDS, ModelConfig
from jaxgpt.hub import hf, tokenizer_io

HuggingFaceError = hf.HuggingFaceError
PREFIX = "model."  # LlamaForCausalLM's name for its LlamaModel.
INDEX = hf.ST_INDEX  # A sharded checkpoint's table of contents.
# Files a Hub download fetches: the weights, config and tokenizer only.
HUB_FILES = [
    "config.json",
    "model.safetensors",
    INDEX,
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
# A Hugging Face Hub repository id: owner/name.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------- config.json


def rope_theta(c: Mapping[str, Any]) -> float:
    """The rotary base of a LlamaConfig: rope_parameters (transformers >= 5) or
    the older rope_theta / rope_scaling; refuses any rope scaling."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise HuggingFaceError(
            f"config.json has rope_type={kind!r} (rope scaling), which jaxgpt's GPT"
            " cannot compute: it turns queries and keys by the default rope_type."
        )
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def llama_params(c: Mapping[str, Any], path: str = "config.json") -> int:
    """The parameter count of the LlamaConfig `c` (refused unless its sizes are
    positive integers and its key/value heads divide its heads)."""
    s = hf.size_fields(c, LLAMA_SIZES, path)
    V, C, L, F = (s[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                 "intermediate_size"))  # fmt: skip
    H = s["num_attention_heads"]
    K = hf.size_fields(c, {"num_key_value_heads": H}, path)["num_key_value_heads"]
    D = hf.size_fields(c, {"head_dim": max(C // H, 1)}, path)["head_dim"]
    if H % K:
        raise HuggingFaceError(
            f"{path} has num_key_value_heads={K} (jaxgpt's n_kv_head={K}), which"
            f" must divide num_attention_heads={H}: each key/value head serves"
            " num_attention_heads / num_key_value_heads query heads."
        )
    head = 1 if c.get("tie_word_embeddings", False) else 2
    return head * V * C + L * ((2 * H + 2 * K) * D * C + 3 * C * F + 2 * C) + C


# A LlamaConfig's sizes and transformers' defaults for them.
LLAMA_SIZES = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
}


def config_from_llama(c: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face LlamaConfig (as read from config.json).

    Refuses the options jaxgpt's GPT cannot compute, naming them, and sizes that
    are not positive integers. dropout is 0 (inference); pass another with
    dataclasses.replace to finetune.
    """
    llama_params(c)  # The sizes are positive integers.
    C, H = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    bias = c.get("attention_bias", False)
    # (option, value jaxgpt computes, value in this config); absent = HF default.
    checks = [
        ("model_type", "llama", c.get("model_type")),
        ("hidden_act", "silu", c.get("hidden_act", "silu")),
        ("head_dim", C // H, c.get("head_dim") or C // H),
        ("mlp_bias", bias, c.get("mlp_bias", False)),
    ]
    for option, supported, value in checks:
        if value != supported:
            raise HuggingFaceError(
                f"config.json has {option}={value!r}, which jaxgpt's GPT cannot"
                f" compute (it needs {option}={supported!r})."
            )
    try:
        return ModelConfig(
            vocab_size=c.get("vocab_size", 32000),
            block_size=c.get("max_position_embeddings", 2048),
            n_layer=c.get("num_hidden_layers", 32),
            n_head=H,
            n_embd=C,
            n_kv_head=c.get("num_key_value_heads") or H,
            dropout=0.0,
            bias=bias,
            position="rope",
            rope_theta=rope_theta(c),
            norm="rmsnorm",
            norm_eps=c.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            mlp_hidden=c.get("intermediate_size", 11008),
            tie_embeddings=c.get("tie_word_embeddings", False),
        )
    except (ValueError, TypeError, AttributeError) as e:  # A ConfigError (sizes
        # that do not fit together), or a value of the wrong type.
        raise HuggingFaceError(f"config.json: {e}") from None


# What the Llama layout holds of each architecture option (None: any value).
LLAMA_HOLDS = {
    "position": "rope",
    "rope_theta": None,
    "norm": "rmsnorm",
    "norm_scale": None,  # None is written as ones: the same function.
    "norm_eps": None,
    "qk_norm": False,
    "mlp": "swiglu",
    "mlp_hidden": None,
    "n_kv_head": None,
    "tie_embeddings": None,
    "logit_cap": 0.0,
}


def check_exportable(cfg: ModelConfig) -> None:
    """Refuses, in one line naming the option, a model the layout cannot hold."""
    if cfg.model != "gpt":
        raise HuggingFaceError(f"only a GPT exports to Llama, not a {cfg.model!r}.")
    for name, holds in LLAMA_HOLDS.items():
        value = getattr(cfg, name)
        if holds is not None and value != holds:
            raise HuggingFaceError(
                f"the model has --{name}={value}, which Hugging Face's Llama layout"
                f" cannot hold (it has {name}={holds}): export it with"
                " --format=gpt2 if GPT-2's can, or keep it in jaxgpt's checkpoints."
            )


def config_to_llama(
    cfg: ModelConfig, token_ids: Mapping[str, int | None] | None = None
) -> dict[str, Any]:
    """config.json for `cfg`: a LlamaConfig transformers loads. token_ids: its
    bos_token_id and eos_token_id (else unset: no id is known)."""
    check_exportable(cfg)
    ids = {"bos_token_id": None, "eos_token_id": None, **(token_ids or {})}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # For transformers < 5.
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        **ids,
    }


# ------------------------------------------------------------------- tensors


def llama_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LlamaForCausalLM with `cfg`'s shapes, by HF name."""
    V, C, F = cfg.vocab_size, cfg.n_embd, cfg.hidden_dim
    HD, KD = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(cfg.n_layer):
        layer = f"model.layers.{i}"
        for name, n_out, n_in in (
            ("self_attn.q_proj", HD, C),
            ("self_attn.k_proj", KD, C),
            ("self_attn.v_proj", KD, C),
            ("self_attn.o_proj", C, HD),
            ("mlp.gate_proj", F, C),
            ("mlp.up_proj", F, C),
            ("mlp.down_proj", C, F),
        ):
            shapes[f"{layer}.{name}.weight"] = (n_out, n_in)  # nn.Linear: [out, in].
            if cfg.bias:
                shapes[f"{layer}.{name}.bias"] = (n_out,)
        shapes[f"{layer}.input_layernorm.weight"] = (C,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (C,)
    shapes["model.norm.weight"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


# jaxgpt's fused kernels and the HF projections they hold, in column order.
FUSED = {
    ("attn", "c_attn"): ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("attn", "c_proj"): ("self_attn.o_proj",),
    ("mlp", "c_fc"): ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp", "c_proj"): ("mlp.down_proj",),
}
NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}


def check_tensors(tensors: Mapping[str, Any], cfg: ModelConfig) -> None:
    """Every tensor of `cfg`'s Llama is there with its shape, and nothing else
    (a tied lm_head.weight aside)."""
    shapes = llama_shapes(cfg)
    for name, shape in shapes.items():
        if name not in tensors:
            raise HuggingFaceError(
                f"tensor {name!r} {list(shape)} is missing: not the Llama that the"
                f" config describes (n_layer={cfg.n_layer}, n_embd={cfg.n_embd},"
                f" n_kv_head={cfg.kv_heads}, bias={cfg.bias},"
                f" tie_embeddings={cfg.tie_embeddings})."
            )
        if tuple(tensors[name].shape) != shape:
            raise HuggingFaceError(
                f"tensor {name!r} has shape {list(tensors[name].shape)}, but the"
                f" config gives {list(shape)}."
            )
    unexpected = sorted(set(tensors) - set(shapes) - {"lm_head.weight"})
    if unexpected:
        raise HuggingFaceError(
            f"unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more):"
            " not a LlamaForCausalLM checkpoint."
        )


def params_from_llama(tensors: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """jaxgpt parameters (float32; stacked if cfg.scan_layers) from HF tensors."""
    check_tensors(tensors, cfg)
    f32 = lambda name: np.asarray(tensors[name], dtype=np.float32)
    tied_head = cfg.tie_embeddings and "lm_head.weight" in tensors
    if tied_head and not np.array_equal(
        f32("lm_head.weight"), f32("model.embed_tokens.weight")
    ):
        raise HuggingFaceError(
            "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight',"
            " but config.json has tie_word_embeddings=true: set it to false."
        )
    params: dict[str, Any] = {"wte": {"embedding": f32("model.embed_tokens.weight")}}
    for i in range(cfg.n_layer):
        layer, block = f"model.layers.{i}", {}
        for (part, name), projections in FUSED.items():
            names = [f"{layer}.{p}" for p in projections]
            dense = {"kernel": np.concatenate([f32(f"{n}.weight").T for n in names], 1)}
            if cfg.bias:
                dense["bias"] = np.concatenate([f32(f"{n}.bias") for n in names])
            block.setdefault(part, {})[name] = dense
        for ln, hf_name in NORMS.items():
            block[ln] = {"scale": f32(f"{layer}.{hf_name}.weight")}
        params[f"h_{i}"] = block
    params["ln_f"] = {"scale": f32("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": f32("lm_head.weight").T}
    if not cfg.norm_scale:  # An HF RMSNorm always has a weight: it must be ones.
        for path, scale in _scales(params):
            if not np.all(scale == 1.0):
                raise HuggingFaceError(
                    f"norm weight {path} is not all ones, but the model has"
                    " --nonorm_scale: load it with --norm_scale."
                )
        params = _drop_scales(params)
    params = {k: _tree_to_jnp(v) for k, v in params.items()}
    return hf.stack_blocks(params) if cfg.scan_layers else params


def params_to_llama(params: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """HF tensors (LlamaForCausalLM's names, float32) from jaxgpt parameters.

    A --nonorm_scale model's norm weights are written as ones (HF's RMSNorm
    always has them), which computes the same function."""
    check_exportable(cfg)
    if cfg.scan_layers:
        params = hf.unstack_blocks(params)
    get = lambda *path: _leaf(params, path)
    ones = np.ones(cfg.n_embd, np.float32)
    scale = lambda *path: get(*path, "scale") if cfg.norm_scale else ones
    shapes = llama_shapes(cfg)
    tensors = {"model.embed_tokens.weight": get("wte", "embedding")}
    for i in range(cfg.n_layer):
        layer = f"model.layers.{i}"
        for (part, name), projections in FUSED.items():
            sizes = [shapes[f"{layer}.{p}.weight"][0] for p in projections]
            cuts = np.cumsum(sizes)[:-1]
            kernel = get(f"h_{i}", part, name, "kernel")
            for p, w in zip(projections, np.split(kernel, cuts, axis=1)):
                tensors[f"{layer}.{p}.weight"] = w.T
            if cfg.bias:
                bias = get(f"h_{i}", part, name, "bias")
                for p, b in zip(projections, np.split(bias, cuts)):
                    tensors[f"{layer}.{p}.bias"] = b
        for ln, hf_name in NORMS.items():
            tensors[f"{layer}.{hf_name}.weight"] = scale(f"h_{i}", ln)
    tensors["model.norm.weight"] = scale("ln_f")
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = get("lm_head", "kernel").T
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    check_tensors(tensors, cfg)
    return tensors


def _leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
    node = params
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        raise HuggingFaceError(
            f"parameter {'/'.join(path)} is missing: the parameters are not those"
            " of this ModelConfig."
        )
    return np.asarray(node)


def _scales(tree, path=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _scales(value, (*path, key))
        elif key == "scale":
            yield "/".join((*path, key)), value


def _drop_scales(tree):
    return {
        k: _drop_scales(v) if isinstance(v, Mapping) else v
        for k, v in tree.items()
        if not (isinstance(v, Mapping) and set(v) == {"scale"})
    }


def _tree_to_jnp(tree):
    if isinstance(tree, Mapping):
        return {k: _tree_to_jnp(v) for k, v in tree.items()}
    return jnp.asarray(tree)


# ---------------------------------------------------------------- files


read_safetensors = hf.read_safetensors  # One .safetensors file, header checked.


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """The tensors of a folder: model.safetensors (or pytorch_model.bin), or the
    shards an index names (each checked to lie in the folder)."""
    return hf.read_weights(folder)


def download(repo_id: str) -> str:
    """The local folder of a Hub repository (its weights, config and tokenizer;
    the Hub's cache, filled if online)."""
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except (OSError, ValueError, huggingface_hub.errors.HfHubHTTPError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HuggingFaceError(
            f"{repo_id!r} is no folder here, and the Hugging Face Hub could not give"
            f" it ({reason}): offline, pass a local folder with config.json,"
            " model.safetensors and tokenizer.json instead (e.g. made by `hf"
            f" download {repo_id}` on a machine online)."
        ) from e


def find(name_or_path: str) -> tuple[str, str]:
    """(kind, where) of --init_from: ("gpt2", a released size or a GPT-2 folder)
    or ("llama", a LlamaForCausalLM folder), downloading a Hub repository."""
    if name_or_path in hf.HUB_REPOS:
        return "gpt2", name_or_path
    if os.path.isdir(name_or_path):
        folder = name_or_path
    elif REPO_ID.fullmatch(name_or_path) and not os.path.exists(name_or_path):
        folder = download(name_or_path)
    else:
        raise HuggingFaceError(
            f"{name_or_path!r} is neither a folder, a Hugging Face Hub repository"
            f" (owner/name), nor one of {', '.join(hf.HUB_REPOS)}."
        )
    try:
        model_type = hf.read_json(os.path.join(folder, "config.json")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # hf.load_gpt2 names what is wrong.
    if model_type == "llama":
        return "llama", folder
    if model_type not in (None, "gpt2"):
        raise HuggingFaceError(
            f"{name_or_path} holds a {model_type!r} model: jaxgpt reads 'gpt2' and"
            " 'llama' (LlamaForCausalLM) models."
        )
    return "gpt2", folder


def load_llama(folder: str, **overrides: Any) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a LlamaForCausalLM folder. overrides set the
    fields config.json leaves open (dropout, dtype, remat, scan_layers,
    attention) and a shorter block_size (no table depends on it with rope)."""
    bad = sorted(set(overrides) - {*RUNTIME_FIELDS, "block_size"})
    if bad:
        raise HuggingFaceError(
            f"load_llama cannot override {bad[0]!r}: config.json fixes it."
        )
    config_path = os.path.join(folder, "config.json")
    config_json = hf.read_json(config_path)
    if not isinstance(config_json, dict):
        raise HuggingFaceError(
            f"{config_path} is a JSON {type(config_json).__name__}, not a"
            " LlamaConfig object."
        )
    hf.check_fits_memory(llama_params(config_json, config_path), config_path)
    cfg = config_from_llama(config_json)
    if overrides.get("block_size", 0) > cfg.block_size:
        raise HuggingFaceError(
            f"--block_size={overrides['block_size']} exceeds the model's"
            f" max_position_embeddings={cfg.block_size}."
        )
    cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    return cfg, params_from_llama(read_tensors(folder), cfg)


def load_tokenizer(folder: str):
    """The folder's tokenizer.json, as a jaxgpt tokenizer (tokenizer_io.HFTokenizer),
    with the bos and eos tokens tokenizer_config.json names; or jaxgpt's own,
    which an export of a char or BPE run writes instead."""
    own = os.path.join(folder, hf.TOKENIZER_JSON)
    if os.path.isfile(own):
        with open(own, encoding="utf-8") as f:
            return tokenizer_io.from_json(json.load(f))
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise HuggingFaceError(
            f"{folder} has no tokenizer.json (Hugging Face tokenizers' file), which"
            f" a Llama-family model brings its tokenizer in, nor {hf.TOKENIZER_JSON}."
        )
    with open(path, encoding="utf-8") as f:
        tokenizer_json = json.load(f)
    specials = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        config = hf.read_json(config_path)
        if not isinstance(config, dict):
            raise HuggingFaceError(
                f"{config_path} is a JSON {type(config).__name__}, not an object."
            )
        for key in ("bos_token", "eos_token"):
            token = config.get(key)
            token = token.get("content") if isinstance(token, Mapping) else token
            if isinstance(token, str):
                specials[key] = token
    return tokenizer_io.HFTokenizer(tokenizer_json, **specials)


def save_llama(
    params: Mapping[str, Any],
    cfg: ModelConfig,
    out_dir: str,
    tokenizer_files: Mapping[str, bytes | str] | None = None,
    token_ids: Mapping[str, int | None] | None = None,
) -> None:
    """Writes a folder that transformers' LlamaForCausalLM.from_pretrained loads:
    config.json, model.safetensors and `tokenizer_files` (name -> contents)."""
    config_json = config_to_llama(cfg, token_ids)  # Refuses what it cannot hold.
    tensors = params_to_llama(params, cfg)
    hf.write_folder(out_dir, config_json, tensors, tokenizer_files)
