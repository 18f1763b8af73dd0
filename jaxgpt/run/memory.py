"""Sizes that cannot fit: refused in one line before anything is allocated.

A batch or a number of samples too large for the machine would otherwise
allocate for minutes (host memory first: the evaluation batches, drawn on the
host) and end in an out-of-memory crash or a RESOURCE_EXHAUSTED traceback
from XLA. These are lower bounds of what a step or a sample needs, the
largest arrays only, compared with the memory of the devices (on CPU: the
machine's physical memory): a size refused here could never run.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.run.configs import SampleConfig

F32 = 4  # Bytes: logits are float32 whatever the compute dtype; ids are int32.


def physical_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available() -> tuple[int, str] | None:
    """(bytes, what they are) of the memory the run's arrays can use: the
    devices' own, or the machine's physical memory on CPU; None if unknown."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        try:
            return physical_memory(), "the machine's physical memory"
        except (ValueError, OSError):
            return None
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if not all(limits):
        return None
    return sum(limits), f"the memory of {len(devices)} {devices[0].device_kind}"


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def train_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, int]:
    """The largest arrays of a training step and of an evaluation, in bytes
    (lower bounds: each is needed at once, whatever else is)."""
    B, T, V = train_cfg.batch_size, model_cfg.block_size, model_cfg.vocab_size
    b = B // train_cfg.grad_accum_steps  # The micro-batch a step computes at once.
    return {
        f"the logits of a micro-batch ({b:,} x block_size {T:,} x vocabulary"
        f" {V:,} x {F32} bytes)": b * T * V * F32,
        f"the evaluation batches ({train_cfg.eval_iters:,} x batch {B:,} x"
        f" {T:,} tokens x 2 x {F32} bytes)": train_cfg.eval_iters * B * T * 2 * F32,
    }


def sample_bytes(model_cfg: ModelConfig, sample_cfg: SampleConfig) -> dict[str, int]:
    """The largest arrays of sampling, in bytes (lower bounds)."""
    N, T, V = sample_cfg.num_samples, model_cfg.block_size, model_cfg.vocab_size
    K = model_cfg.kv_heads * model_cfg.head_dim
    item = np.dtype(model_cfg.dtype).itemsize
    return {
        f"the logits of {N:,} samples ({N:,} x vocabulary {V:,} x {F32} bytes)": (
            N * V * F32
        ),
        f"one layer's keys and values of {N:,} samples ({N:,} x block_size {T:,}"
        f" x 2 x {K:,} x {item} bytes)": N * T * 2 * K * item,
    }


def check(needs: dict[str, int], fix: str) -> None:
    """ConfigError naming the largest need and the memory, if it exceeds it."""
    have = available()
    if have is None or not needs:
        return
    what, size = max(needs.items(), key=lambda kv: kv[1])
    if size > have[0]:
        raise ConfigError(
            f"{what} need {gb(size)}, more than {have[1]} ({gb(have[0])}): {fix}"
        )


def check_train(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Refuses a --batch_size (with --block_size and the vocabulary) that
    cannot fit in memory, before any array is made."""
    check(
        train_bytes(model_cfg, train_cfg),
        f"lower --batch_size={train_cfg.batch_size} (or raise --grad_accum_steps"
        " to keep it, lower --eval_iters or --block_size).",
    )


def check_sample(model_cfg: ModelConfig, sample_cfg: SampleConfig) -> None:
    """Refuses a --num_samples that cannot fit in memory, before sampling."""
    check(
        sample_bytes(model_cfg, sample_cfg),
        f"lower --num_samples={sample_cfg.num_samples} (draw them in several runs).",
    )
