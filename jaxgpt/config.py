"""The core's options, each defined once: frozen dataclasses validated on construction.

A field with help text is a command-line flag of the same name (the engine
makes the flags from these fields, and from its own in run/configs.py: type,
default and help come from here and nowhere else; a `Literal` type lists the
flag's choices). A bad value raises `ConfigError` naming the flag and how to
fix it. Every module takes the config it needs and arrays; only main.py
reads flags.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value the user must change (the message names the flag)."""


def option(default: Any, help: str) -> Any:
    """A field that is also a command-line flag: its default and its help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The (field, resolved type) pairs of `cls` that are command-line flags."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def check_choices(config: Any) -> None:
    """Every `Literal` field holds one of its choices, every float is finite."""
    check_finite(config)
    for field, hint in flag_fields(type(config)):
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        value = getattr(config, field.name)
        if choices and value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ConfigError(
                f"--{field.name}={value!r} is unknown: use one of {shown}."
            )


def require_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:  # Also NaN.
            raise ConfigError(f"--{name}={value} must be positive.")


def check_finite(config: Any) -> None:
    """Every float option is a finite number (NaN or inf would fail only
    later, mid-run)."""
    for field, _ in flag_fields(type(config)):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{field.name}={value} must be a finite number.")


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a --model is, read where it matters (never its name)."""

    gpt: bool  # GPT's options, Hugging Face formats and FLOP count apply.
    lecture: bool  # A step of the lecture: none of GPT's options, and no KV
    # cache (sampling re-runs the window, as the lecture's generate() does).


KINDS = {
    "gpt": Kind(gpt=True, lecture=False),
    "bigram": Kind(gpt=False, lecture=False),
    **{
        f"lecture_{step}": Kind(gpt=False, lecture=True)
        for step in ("head", "heads", "ffwd", "residual", "layernorm")
    },
}
ModelName = Literal[tuple(KINDS)]  # The --model choices: KINDS' names.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: nanoGPT's GPT, the bigram baseline, or a step of the lecture."""

    vocab_size: int  # V: set by the tokenizer, not a flag.
    model: ModelName = option(  # noqa: RUF009 (a Literal, as the fields below)
        "gpt", "Architecture: nanoGPT's GPT, the bigram, or a step of the lecture."
    )
    block_size: int = option(256, "T: context length in tokens.")
    n_layer: int = option(6, "L: transformer blocks.")
    n_head: int = option(6, "H: attention heads per block.")
    n_embd: int = option(384, "C: embedding width (divisible by n_head).")
    dropout: float = option(0.0, "Dropout rate while training.")
    bias: bool = option(
        False, "Biases in Dense and LayerNorm layers (nanoGPT trains without)."
    )
    # The architecture's choices (ARCHITECTURE_CHOICES): GPT-2's by default, a
    # modern GPT's otherwise (experiments/shakespeare_cpu_modern.cfg;
    # docs/architecture.md):
    position: Literal["learned", "rope"] = option(
        "learned",
        "Positions: a learned table added to the token embeddings (GPT-2), or"
        " rope: rotary embeddings of the queries and keys (no table).",
    )
    rope_theta: float = option(
        10000.0, "RoPE's base: channel pair i turns by rope_theta^(-2i/D) per position."
    )
    norm: Literal["layernorm", "rmsnorm"] = option(
        "layernorm", "The norms: LayerNorm (GPT-2) or RMSNorm (no mean, no bias)."
    )
    norm_scale: bool = option(
        True,
        "A learned per-channel scale in every norm (--nonorm_scale: none, as"
        " nanochat's RMSNorm).",
    )
    norm_eps: float = option(1e-5, "Epsilon added to the variance in every norm.")
    qk_norm: bool = option(
        False, "Normalise each head's queries and keys (with --norm) before RoPE."
    )
    mlp: Literal["gelu", "relu2", "swiglu"] = option(
        "gelu",
        "Feed-forward activation: gelu (tanh, GPT-2's), relu2 (ReLU squared), or"
        " swiglu (SiLU(x W_gate) * x W_up: two input matrices).",
    )
    mlp_hidden: int | None = option(
        None,
        "F: the feed-forward's hidden width. Default 4C; with swiglu 8C/3 rounded"
        " up to a multiple of 32 (about the parameters of 4C).",
    )
    n_kv_head: int | None = option(
        None,
        "Key/value heads, dividing n_head: default n_head; fewer is grouped-query"
        " attention (1: multi-query).",
    )
    tie_embeddings: bool = option(
        True,
        "The output layer is the token embedding (GPT-2); --notie_embeddings: an"
        " lm_head matrix of its own.",
    )
    logit_cap: float = option(
        0.0, "Soft-cap the logits at cap * tanh(logits / cap) (nanochat: 15; 0: off)."
    )
    # How the same network computes (RUNTIME_FIELDS, with dropout; none of these
    # changes the math):
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        "Compute dtype of the blocks; parameters, softmax, logits and loss stay"
        " float32.",
    )
    remat: bool = option(
        False, "Recompute each block's activations in the backward pass."
    )
    scan_layers: bool = option(
        False,
        "nn.scan over the blocks: compile time flat in n_layer (parameters stacked"
        " on a layer axis, so checkpoints differ).",
    )
    attention: Literal["einsum", "dot_product", "cudnn"] = option(
        "einsum",
        "einsum (the math, spelled out), jax.nn.dot_product_attention (XLA's), or"
        " cudnn (its cuDNN flash attention: NVIDIA GPU, bfloat16). The last two have"
        " no attention dropout.",
    )

    def __post_init__(self):
        check_choices(self)
        require_positive(
            vocab_size=self.vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
        )
        if self.n_embd % self.n_head:
            lo = self.n_embd - self.n_embd % self.n_head
            raise ConfigError(
                f"--n_embd={self.n_embd} is not divisible by --n_head={self.n_head}:"
                f" choose a multiple of n_head (e.g. --n_embd={lo or self.n_head} or"
                f" --n_embd={lo + self.n_head}), or change --n_head."
            )
        if self.n_kv_head is not None and (
            self.n_kv_head <= 0 or self.n_head % self.n_kv_head
        ):
            divisors = [k for k in range(1, self.n_head + 1) if self.n_head % k == 0]
            raise ConfigError(
                f"--n_kv_head={self.n_kv_head} must divide --n_head={self.n_head}"
                f" (each key/value head serves n_head / n_kv_head query heads): use"
                f" one of {divisors}."
            )
        if self.mlp_hidden is not None:
            require_positive(mlp_hidden=self.mlp_hidden)
        # One spelling of each model: a default given explicitly is the default.
        if self.n_kv_head == self.n_head:
            object.__setattr__(self, "n_kv_head", None)
        if self.mlp_hidden == self.default_hidden():
            object.__setattr__(self, "mlp_hidden", None)
        require_positive(rope_theta=self.rope_theta, norm_eps=self.norm_eps)
        if self.logit_cap < 0:
            raise ConfigError(
                f"--logit_cap={self.logit_cap} must be >= 0 (0 turns it off)."
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"--position=rope turns channel pairs, but the head size --n_embd /"
                f" --n_head = {self.head_dim} is odd: choose an even head size."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout={self.dropout} must be in [0, 1).")
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
        if self.kind.lecture:  # None of GPT's ways to compute.
            gpt_only = self.changed(RUNTIME_FIELDS + ARCHITECTURE_CHOICES)
            gpt_only.pop("dropout", None)  # The lecture's models have dropout.
            for name, value in gpt_only.items():
                shown = name if value is True else f"{name}={value}"
                raise ConfigError(
                    f"--model={self.model} (a step of the lecture) has no"
                    f" --{shown}: drop it, or use --model=gpt."
                )

    @property
    def kind(self) -> Kind:
        return KINDS[self.model]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """K: key/value heads (n_kv_head, default n_head)."""
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """F: the feed-forward's hidden width (mlp_hidden, or its default)."""
        return self.mlp_hidden or self.default_hidden()

    def default_hidden(self) -> int:
        if self.mlp == "swiglu":  # Two input matrices: 3CF = 8C^2 at F = 8C/3.
            return -(-8 * self.n_embd // (3 * 32)) * 32
        return 4 * self.n_embd

    def changed(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The fields among `names` whose values are not their defaults."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in names and getattr(self, f.name) != f.default
        }

    def check_length(self, T: int) -> None:
        """Refuses a sequence of T tokens longer than the model's context."""
        if T > self.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.block_size}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ModelConfig's architecture options beyond nanoGPT's (GPT-2's choices by default).
ARCHITECTURE_CHOICES = (
    "position", "rope_theta", "norm", "norm_scale", "norm_eps", "qk_norm", "mlp",
    "mlp_hidden", "n_kv_head", "tie_embeddings", "logit_cap",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation: what the train step and evaluate take."""

    batch_size: int = option(64, "B: sequences per step, over all devices and hosts.")
    grad_accum_steps: int = option(
        1, "Micro-batches per step (--batch_size a multiple of it)."
    )
    max_iters: int = option(5000, "The schedule's length: training ends here.")
    optimizer: Literal["adamw", "muon"] = option(
        "adamw",
        "adamw, or muon: Muon (muon.py: optax.contrib.muon's orthogonalised"
        " momentum) on the blocks' matrices and AdamW on the embeddings, gains and"
        " biases, one schedule for both.",
    )
    learning_rate: float = option(1e-3, "Peak learning rate.")
    min_lr: float = option(1e-4, "Learning rate at the end of the decay.")
    warmup_iters: int = option(100, "Linear warmup steps.")
    lr_decay_iters: int | None = option(
        None, "Cosine decay length (default: --max_iters)."
    )
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.99, "AdamW beta2.")
    grad_clip: float = option(1.0, "Global-norm gradient clip (0: off).")
    eval_iters: int = option(200, "Batches per evaluation estimate.")

    def __post_init__(self):
        check_choices(self)
        require_positive(
            batch_size=self.batch_size,
            grad_accum_steps=self.grad_accum_steps,
            max_iters=self.max_iters,
            learning_rate=self.learning_rate,
            eval_iters=self.eval_iters,
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
        if self.warmup_iters > self.max_iters:
            raise ConfigError(
                f"--warmup_iters={self.warmup_iters} exceeds --max_iters="
                f"{self.max_iters}: the learning rate would never reach its peak."
                " Lower --warmup_iters or raise --max_iters."
            )
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--weight_decay and --grad_clip must be >= 0.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("--beta1 and --beta2 must lie in [0, 1).")


# ModelConfig's options that change how, not what, the model computes: a run's
# flags set them on any checkpoint or imported model.
RUNTIME_FIELDS = ("dropout", "dtype", "remat", "scan_layers", "attention")
