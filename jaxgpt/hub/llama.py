"""Llama-family models in Hugging Face's layout: config.json and the tensor table.

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

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxgpt.config import RUNTIME_FIELDS, ModelConfig
from jaxgpt.hub import hf
from jaxgpt.hub.hf import HuggingFaceError

MODEL = "LlamaForCausalLM"
HUB_REPOS: dict[str, str] = {}  # No short names: owner/name.
OVERRIDES = (*RUNTIME_FIELDS, "block_size")  # A shorter one: no table needs it.
TOKENIZER = ("tokenizer.json", "vocab.json")  # The tokenizer files, preferred first.


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


def n_params(c: Mapping[str, Any], path: str = "config.json") -> int:
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


def config_from_hf(c: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face LlamaConfig (as read from config.json).

    Refuses the options jaxgpt's GPT cannot compute, naming them, and sizes that
    are not positive integers. dropout is 0 (inference); pass another with
    dataclasses.replace to finetune.
    """
    n_params(c)  # The sizes are positive integers.
    C, H = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    bias = c.get("attention_bias", False)
    # (option, value jaxgpt computes, value in this config); absent = HF default.
    checks = [
        ("model_type", "llama", c.get("model_type")),
        ("hidden_act", "silu", c.get("hidden_act", "silu")),
        ("head_dim", C // H, c.get("head_dim") or C // H),
        ("mlp_bias", bias, c.get("mlp_bias", False)),
    ]
    hf.check_options(checks)
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
    if not cfg.kind.gpt:
        raise HuggingFaceError(f"only a GPT exports to Llama, not a {cfg.model!r}.")
    for name, holds in LLAMA_HOLDS.items():
        value = getattr(cfg, name)
        if holds is not None and value != holds:
            raise HuggingFaceError(
                f"the model has --{name}={value}, which Hugging Face's Llama layout"
                f" cannot hold (it has {name}={holds}): export it with"
                " --format=gpt2 if GPT-2's can, or keep it in jaxgpt's checkpoints."
            )


def config_to_hf(
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

A, M = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
# HF tensors ("{i}": each layer; several: concatenated in turn), the jaxgpt
# parameter they make, and their shapes (nn.Linear weights: [out, in]).
TABLE = [
    ("model.embed_tokens.weight", "wte/embedding", "V C"),
    ("model.layers.{i}.input_layernorm.weight", "h_{i}/ln_1/scale", "C"),
    (
        (A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"),
        "h_{i}/attn/c_attn/kernel",
        ("HD C", "KD C", "KD C"),
    ),
    (
        (A + "q_proj.bias", A + "k_proj.bias", A + "v_proj.bias"),
        "h_{i}/attn/c_attn/bias",
        ("HD", "KD", "KD"),
    ),
    (A + "o_proj.weight", "h_{i}/attn/c_proj/kernel", "C HD"),
    (A + "o_proj.bias", "h_{i}/attn/c_proj/bias", "C"),
    ("model.layers.{i}.post_attention_layernorm.weight", "h_{i}/ln_2/scale", "C"),
    (
        (M + "gate_proj.weight", M + "up_proj.weight"),
        "h_{i}/mlp/c_fc/kernel",
        ("F C",) * 2,
    ),
    ((M + "gate_proj.bias", M + "up_proj.bias"), "h_{i}/mlp/c_fc/bias", ("F", "F")),
    (M + "down_proj.weight", "h_{i}/mlp/c_proj/kernel", "C F"),
    (M + "down_proj.bias", "h_{i}/mlp/c_proj/bias", "C"),
    ("model.norm.weight", "ln_f/scale", "C"),
    ("lm_head.weight", "lm_head/kernel", "V C"),
]


def table(cfg: ModelConfig) -> hf.Table:
    """The tensors of a LlamaForCausalLM with `cfg`'s sizes and the parameters
    they are: biases only with --bias, lm_head only untied; a --nonorm_scale
    model's norm weights are ones in HF's RMSNorm, which always has them."""
    dims = {
        "V": cfg.vocab_size,
        "C": cfg.n_embd,
        "F": cfg.hidden_dim,
        "HD": cfg.n_head * cfg.head_dim,
        "KD": cfg.kv_heads * cfg.head_dim,
    }
    shapes, rows, fixed = {}, [], {}
    for names, path, sizes in hf.expand(TABLE, cfg.n_layer, dims):
        if (path[-1] == "bias" and not cfg.bias) or (
            path[0] == "lm_head" and cfg.tie_embeddings
        ):
            continue
        shapes.update(zip(names, sizes))
        if path[-1] == "scale" and not cfg.norm_scale:
            fixed[names[0]] = (
                1.0,
                "the model has --nonorm_scale: load it with --norm_scale",
            )
        else:
            rows.append(hf.Row(names, path, linear=path[-1] == "kernel"))
    describe = (
        f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_kv_head={cfg.kv_heads},"
        f" bias={cfg.bias}, tie_embeddings={cfg.tie_embeddings}"
    )
    tied = (
        ("lm_head.weight", "model.embed_tokens.weight") if cfg.tie_embeddings else None
    )
    return hf.Table(MODEL, describe, shapes, rows, fixed, tied)


def params_from_hf(tensors: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """jaxgpt parameters (float32; stacked if cfg.scan_layers) from HF tensors
    (checked against `cfg` first)."""
    return hf.params_from_hf(tensors, table(cfg), cfg.scan_layers)


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors (LlamaForCausalLM's names, float32) from jaxgpt parameters."""
    check_exportable(cfg)
    return hf.params_to_hf(params, table(cfg), cfg.scan_layers)
