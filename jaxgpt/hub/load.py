"""What a run reads: the dataset (prepared first if need be), and the model to
sample, evaluate or export (a workdir's checkpoint, or --init_from's GPT-2 or
Llama-family weights) with its config and tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from absl import logging

from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.hub import hf, llama, tokenizer_io
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import hosts, program
from jaxgpt.run.configs import RunConfig


def say(line: str) -> None:
    """A warning line from process 0."""
    if hosts.is_main_process():
        logging.warning(line)


def import_weights(init_from: str, overrides: Mapping[str, Any] = MappingProxyType({})):
    """(model config, parameters, tokenizer) of --init_from's GPT-2 (hf.py) or
    Llama-family model (llama.py). `overrides` sets ModelConfig's runtime
    fields (config.RUNTIME_FIELDS) and, for a Llama-family model, a shorter
    block_size; everything else comes from the model's config.json."""
    try:
        kind, where = llama.find(init_from)
        if kind == "llama":
            model_cfg, params = llama.load_llama(where, **overrides)
            tok = llama.load_tokenizer(where)
        else:
            runtime = {k: v for k, v in overrides.items() if k != "block_size"}
            model_cfg, params = hf.load_gpt2(where, **runtime)
            tok = hf.load_tokenizer(where, model_cfg.vocab_size)
    except ValueError as e:  # hf.HuggingFaceError, or no GPT-2 tokenizer offline.
        raise ConfigError(f"--init_from={init_from}: {e}") from e
    logging.info(
        "%s model from %s: %d layers, %d heads (%d key/value), %d wide, context %d,"
        " vocabulary %d", kind, init_from, model_cfg.n_layer, model_cfg.n_head,
        model_cfg.kv_heads, model_cfg.n_embd, model_cfg.block_size,
        model_cfg.vocab_size,
    )  # fmt: skip
    return model_cfg, params, tok


def load_model(
    run: RunConfig,
    which: str,
    mesh,
    overrides: Mapping[str, Any] = MappingProxyType({}),
):
    """(model config, parameters, tokenizer) to sample or evaluate: --init_from's
    weights, else the newest intact `which` checkpoint in --workdir (its parameters
    and meta only). Reads only: a training run may be writing the workdir; a
    damaged checkpoint is named and the next older one of the same kind used.
    Each checkpoint is read with the model its own (verified) meta describes."""
    if run.init_from:
        return import_weights(run.init_from, overrides)
    check = ckpt.check_run_meta
    with ckpt.Checkpointer(run.workdir, read_only=True, check=check) as checkpointer:
        if not checkpointer.steps(which):
            raise ConfigError(
                f"no {which} checkpoint in --workdir={run.workdir}: train first"
                " (--mode=train), point --workdir at a run, or pass --init_from."
            )

        def target_of(meta: dict):
            return program.abstract_params(ModelConfig(**meta["model"]), mesh)

        other = ckpt.LATEST if which == ckpt.BEST else ckpt.BEST
        (params, meta), _, step = checkpointer.newest_intact(
            lambda w, s: checkpointer.load_own_params(w, s, target_of),
            (which,),
            say=say,
            advice=f"Use --checkpoint={other}, or train again.",
        )
    logging.info("the %s checkpoint of %s, step %d", which, run.workdir, step)
    model_cfg = ModelConfig(**meta["model"])
    try:
        tok = tokenizer_io.from_json(meta["tokenizer"])
    except ValueError as e:  # GPT-2's tokenizer files not found, or a bad one.
        raise ConfigError(f"the checkpoint's tokenizer: {e}") from e
    return model_cfg, params, tok
