"""Frozen configuration dataclasses, validated on construction.

Every module takes one of these and arrays; only `main.py` reads flags. A bad
value raises `ConfigError` naming the flag and how to fix it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A configuration value the user must change (the message names the flag)."""


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"--{name}={value} must be positive.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: nanoGPT's GPT, or the bigram baseline."""

    vocab_size: int
    block_size: int = 256  # T: the longest context the model sees.
    n_layer: int = 6  # L
    n_head: int = 6  # H
    n_embd: int = 384  # C; head size D = C // H.
    dropout: float = 0.0
    bias: bool = True  # Biases in Dense and LayerNorm layers.
    model: str = "gpt"  # "gpt" or "bigram".
    # How the same network computes (none of these changes the math):
    dtype: str = "float32"  # Compute dtype, "float32" or "bfloat16"; params float32.
    remat: bool = False  # Recompute each block's activations in the backward pass.
    scan_layers: bool = False  # nn.scan over the blocks: params stacked on an L axis.
    attention: str = "einsum"  # "einsum", "dot_product" (jax.nn's) or "cudnn".

    def __post_init__(self):
        _require_positive(
            vocab_size=self.vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
        )
        if self.model not in ("gpt", "bigram"):
            raise ConfigError(
                f"--model={self.model!r} is unknown: use 'gpt' or 'bigram'."
            )
        if self.n_embd % self.n_head:
            lo = self.n_embd - self.n_embd % self.n_head
            raise ConfigError(
                f"--n_embd={self.n_embd} is not divisible by --n_head={self.n_head}:"
                f" choose a multiple of n_head (e.g. --n_embd={lo or self.n_head} or"
                f" --n_embd={lo + self.n_head}), or change --n_head."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout={self.dropout} must be in [0, 1).")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"--dtype={self.dtype!r} is unknown: use 'float32' or 'bfloat16'."
            )
        if self.attention not in ("einsum", "dot_product", "cudnn"):
            raise ConfigError(
                f"--attention={self.attention!r} is unknown: use 'einsum',"
                " 'dot_product' or 'cudnn'."
            )
        if self.attention != "einsum" and self.dropout > 0:
            raise ConfigError(
                f"--attention={self.attention} has no dropout on the attention"
                f" weights, but --dropout={self.dropout}: pass --dropout=0 with"
                f" --attention={self.attention}, or keep --attention=einsum."
            )
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ConfigError(
                "--attention=cudnn (cuDNN's flash attention) computes in 16 bits:"
                f" pass --dtype=bfloat16 (not {self.dtype}), or use"
                " --attention=dot_product."
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the parameter tree and shapes.

        dropout, dtype, remat and attention may change on resume; scan_layers
        may not (it stacks the blocks' parameters).
        """
        d = self.to_dict()
        for name in ("dropout", "dtype", "remat", "attention"):
            d.pop(name)
        return d


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, logging and checkpointing."""

    workdir: str = "out"
    batch_size: int = 64  # B: sequences per step, over all devices and hosts.
    grad_accum_steps: int = 1  # Micro-batches per step (each B / this rows).
    max_iters: int = 5000  # The schedule's length: training ends here.
    stop_at: int | None = None  # Stop early at this step (schedule unchanged).
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # Defaults to max_iters.
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # Global-norm clip; 0 disables.
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    seed: int = 1337
    overwrite: bool = False  # Start afresh even if workdir holds a checkpoint.

    def __post_init__(self):
        _require_positive(
            batch_size=self.batch_size,
            grad_accum_steps=self.grad_accum_steps,
            max_iters=self.max_iters,
            learning_rate=self.learning_rate,
            eval_interval=self.eval_interval,
            eval_iters=self.eval_iters,
            log_interval=self.log_interval,
        )
        if self.lr_decay_iters is None:
            object.__setattr__(self, "lr_decay_iters", self.max_iters)
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"--batch_size={self.batch_size} is not divisible by"
                f" --grad_accum_steps={self.grad_accum_steps}: the step splits the"
                " batch into that many equal micro-batches. Choose a multiple."
            )
        if self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ConfigError(
                f"--min_lr={self.min_lr} must lie in [0, --learning_rate"
                f"={self.learning_rate}]."
            )
        if self.warmup_iters < 0:
            raise ConfigError(f"--warmup_iters={self.warmup_iters} must be >= 0.")
        if self.lr_decay_iters <= self.warmup_iters:
            raise ConfigError(
                f"--lr_decay_iters={self.lr_decay_iters} must exceed --warmup_iters="
                f"{self.warmup_iters} (it defaults to --max_iters)."
            )
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_iters:
            raise ConfigError(
                f"--stop_at={self.stop_at} must lie in (0, --max_iters="
                f"{self.max_iters}]."
            )
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--weight_decay and --grad_clip must be >= 0.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("--beta1 and --beta2 must lie in [0, 1).")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Text generation from a trained model."""

    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 means greedy (argmax).
    top_k: int | None = 200  # Keep the k most likely tokens; None keeps all.
    top_p: float = 1.0  # Keep the likeliest tokens holding this much mass; 1: all.
    num_samples: int = 1
    seed: int = 1337
    kv_cache: bool = True  # False re-runs the model on the whole window per token.

    def __post_init__(self):
        _require_positive(
            max_new_tokens=self.max_new_tokens, num_samples=self.num_samples
        )
        if not self.prompt:
            raise ConfigError(
                "--prompt is empty: give at least one character, e.g."
                " --prompt=$'\\n' (the default)."
            )
        if self.temperature < 0:
            raise ConfigError(
                f"--temperature={self.temperature} must be >= 0 (0 samples greedily)."
            )
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(
                f"top_k={self.top_k} must be positive, or None to keep all tokens"
                " (on the command line --top_k=0 keeps all)."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"--top_p={self.top_p} must lie in (0, 1] (1 keeps all tokens)."
            )
