"""GPT-2 in Hugging Face's layout: config.json and the tensor table.

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

import dataclasses
import re
from typing import Any

import numpy as np

from jaxgpt.config import ARCHITECTURE_CHOICES, RUNTIME_FIELDS, ModelConfig
from jaxgpt.hub import hf
from jaxgpt.hub.hf import GPT2_VOCAB_SIZES, HuggingFaceError

MODEL = "GPT2LMHeadModel"
# The released GPT-2 sizes and the Hub repositories that hold them.
HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
OVERRIDES = RUNTIME_FIELDS  # What config.json leaves open (not block_size: wpe).
TOKENIZER = ("vocab.json", "tokenizer.json")  # Else GPT-2's own, by vocab_size.
GPT2_EOS = 50256  # <|endoftext|>, GPT-2's bos and eos token.
PREFIX = "transformer."  # GPT2LMHeadModel's name for its GPT2Model.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

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
    hf.check_options(checks)
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


def n_params(c: dict[str, Any], path: str) -> int:
    """The parameter count of the GPT2Config `c` (refused unless its sizes are
    positive integers)."""
    s = hf.size_fields(
        c,
        {"vocab_size": 50257, "n_positions": 1024, "n_layer": 12, "n_embd": 768},
        path,
    )
    V, T, L, C = s["vocab_size"], s["n_positions"], s["n_layer"], s["n_embd"]
    return (V + T) * C + L * (12 * C * C + 13 * C) + 2 * C


def architecture_choices(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg`'s architecture options whose values are not GPT-2's (name -> value,
    with n_kv_head and mlp_hidden resolved): what GPT-2's layout has no room for."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    defaults.update(n_kv_head=cfg.n_head, mlp_hidden=4 * cfg.n_embd)
    resolved = {**cfg.to_dict(), "n_kv_head": cfg.kv_heads}
    resolved["mlp_hidden"] = cfg.hidden_dim
    return {
        name: resolved[name]
        for name in ARCHITECTURE_CHOICES
        if resolved[name] != defaults[name]
    }


def config_to_hf(cfg: ModelConfig, token_ids: Any = None) -> dict[str, Any]:
    """config.json for `cfg`: a GPT2Config that transformers loads (bos/eos:
    GPT-2's <|endoftext|> when the vocabulary has GPT-2's size, else unset).
    Refuses a model GPT-2's layout cannot hold."""
    if not cfg.kind.gpt:
        raise HuggingFaceError(f"only a GPT exports to GPT-2, not a {cfg.model!r}.")
    choices = architecture_choices(cfg)  # Options GPT-2's layout has no room for.
    if choices:
        name, value = next(iter(choices.items()))
        raise HuggingFaceError(
            f"the model has --{name}={value}, which GPT-2's layout cannot hold"
            " (learned positions, LayerNorm, GELU 4C, one key/value head per head,"
            " tied head): export it with --format=llama if Llama's can."
        )
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

# HF tensor ("{i}": each layer), jaxgpt parameter, shape (Conv1D weights are
# [in, out], as a Dense kernel: nothing is transposed).
TABLE = [
    ("wte.weight", "wte/embedding", "V C"),
    ("wpe.weight", "wpe/embedding", "T C"),
    ("h.{i}.ln_1.weight", "h_{i}/ln_1/scale", "C"),
    ("h.{i}.ln_1.bias", "h_{i}/ln_1/bias", "C"),
    ("h.{i}.attn.c_attn.weight", "h_{i}/attn/c_attn/kernel", "C 3C"),
    ("h.{i}.attn.c_attn.bias", "h_{i}/attn/c_attn/bias", "3C"),
    ("h.{i}.attn.c_proj.weight", "h_{i}/attn/c_proj/kernel", "C C"),
    ("h.{i}.attn.c_proj.bias", "h_{i}/attn/c_proj/bias", "C"),
    ("h.{i}.ln_2.weight", "h_{i}/ln_2/scale", "C"),
    ("h.{i}.ln_2.bias", "h_{i}/ln_2/bias", "C"),
    ("h.{i}.mlp.c_fc.weight", "h_{i}/mlp/c_fc/kernel", "C 4C"),
    ("h.{i}.mlp.c_fc.bias", "h_{i}/mlp/c_fc/bias", "4C"),
    ("h.{i}.mlp.c_proj.weight", "h_{i}/mlp/c_proj/kernel", "4C C"),
    ("h.{i}.mlp.c_proj.bias", "h_{i}/mlp/c_proj/bias", "C"),
    ("ln_f.weight", "ln_f/scale", "C"),
    ("ln_f.bias", "ln_f/bias", "C"),
]


def table(cfg: ModelConfig) -> hf.Table:
    """The tensors of a GPT-2 with `cfg`'s sizes (HF names, no prefix) and the
    parameters they are. A bias=False model's biases are zeros in HF's GPT-2,
    which always has them."""
    V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embd
    dims = {"V": V, "T": T, "C": C, "3C": 3 * C, "4C": 4 * C}
    shapes, rows, fixed = {}, [], {}
    for (name,), path, (shape,) in hf.expand(TABLE, cfg.n_layer, dims):
        shapes[name] = shape
        if name.endswith(".bias") and not cfg.bias:
            fixed[name] = (0.0, "the model has bias=False: load it with bias=True")
        else:
            rows.append(hf.Row((name,), path))
    describe = (
        f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size},"
        f" n_positions={cfg.block_size}"
    )
    return hf.Table(
        MODEL, describe, shapes, rows, fixed, ("lm_head.weight", "wte.weight")
    )


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 with `cfg`'s shapes, by HF name (no prefix)."""
    return table(cfg).shapes


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
    """jaxgpt parameters (float32; stacked if cfg.scan_layers) from the tensors
    of a GPT2Model or GPT2LMHeadModel (checked against `cfg` first)."""
    return hf.params_from_hf(_strip_names(tensors), table(cfg), cfg.scan_layers)


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors (GPT2LMHeadModel's names, float32) from jaxgpt parameters."""
    tensors = hf.params_to_hf(params, table(cfg), cfg.scan_layers)
    return {PREFIX + name: value for name, value in tensors.items()}
