"""--mode=sample: continuations of --prompt from a run's checkpoint or from
--init_from's weights; the same functions sample beside a training run."""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from jaxgpt import generate, lecture, train
from jaxgpt.config import ConfigError
from jaxgpt.hub import load
from jaxgpt.run import cli, hosts, memory
from jaxgpt.run.configs import SampleConfig


def encode_prompt(prompt: str, tok) -> np.ndarray:
    try:
        return tok.encode(prompt)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from e


def draw_samples(params, model_cfg, tok, prompt_ids, cfg: SampleConfig, root, mesh):
    """cfg.num_samples continuations of the prompt, as text, on process 0 (the
    others take part in gathering the parameters and get [])."""
    params = hosts.to_local(params, mesh)  # Every process takes part.
    if not hosts.is_main_process():
        return []
    key = train.stream(root, "sample")
    ids_BA = jax.device_get(
        generate.sample(
            lecture.apply_of(model_cfg),
            params,
            model_cfg,
            prompt_ids,
            key,
            **cfg.options(),
        )
    )
    return [tok.decode(row) for row in ids_BA]


def print_samples(params, model_cfg, tok, prompt_ids, cfg: SampleConfig, root, mesh):
    """Prints cfg.num_samples continuations of the prompt (process 0 prints)."""
    t0 = time.perf_counter()
    texts = draw_samples(params, model_cfg, tok, prompt_ids, cfg, root, mesh)
    if not hosts.is_main_process():
        return
    dt = time.perf_counter() - t0
    for text in texts:
        print(text)
        print("-" * 40)
    logging.info(
        "sampled %d x %d tokens in %.2fs (compile included)",
        cfg.num_samples,
        cfg.max_new_tokens,
        dt,
    )


def run(cmd: cli.Command, mesh) -> int:
    """--mode=sample: samples from the workdir's checkpoint, or from
    --init_from's weights."""
    run, sample_cfg = cmd.run, cmd.sample
    model_cfg, params, tok = load.load_model(
        run, sample_cfg.checkpoint, mesh, cmd.model_overrides()
    )
    prompt_ids = encode_prompt(sample_cfg.prompt, tok)
    memory.check_sample(model_cfg, sample_cfg)
    root = train.root_key(run.seed)
    print_samples(params, model_cfg, tok, prompt_ids, sample_cfg, root, mesh)
    return 0
