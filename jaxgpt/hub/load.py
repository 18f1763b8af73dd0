"""What a run reads: the dataset (prepared first if need be), and the model to
sample, evaluate or export (a workdir's checkpoint, or --init_from's GPT-2 or
Llama-family weights) with its config and tokenizer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from jaxgpt import lecture, sharding
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.hub import gpt2, hf, llama, tokenizer_io
from jaxgpt.hub.hf import HuggingFaceError
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import hosts, program
from jaxgpt.run.configs import RunConfig

# config.json's model_type -> the module of that family's table.
FORMATS = {"gpt2": gpt2, "llama": llama}
HUB_NAMES = {k: v for fmt in FORMATS.values() for k, v in fmt.HUB_REPOS.items()}


def say(line: str) -> None:
    """A warning line from process 0."""
    if hosts.is_main_process():
        logging.warning(line)


def locate(name_or_path: str) -> tuple[Any, str, dict[str, Any]]:
    """(family's table module, local folder, config.json) of a folder, a Hub
    repository (owner/name) or a released GPT-2's name (fetched if need be)."""
    where = hf.fetch(name_or_path, HUB_NAMES)
    config_json = hf.read_config(where)
    model_type = config_json.get("model_type", "gpt2")  # GPT-2's files may omit it.
    if model_type not in FORMATS:
        raise HuggingFaceError(
            f"{name_or_path} holds a {model_type!r} model: jaxgpt reads"
            f" {', '.join(map(repr, FORMATS))} models."
        )
    return FORMATS[model_type], where, config_json


def read_model(name_or_path: str, **overrides: Any) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a Hugging Face model (see locate). overrides set
    the fields config.json leaves open (config.RUNTIME_FIELDS, and a shorter
    block_size where the family allows it). Sizes that cannot fit in memory are
    refused before any weight is read."""
    fmt, where, config_json = locate(name_or_path)
    path = os.path.join(where, "config.json")
    bad = sorted(set(overrides) - set(fmt.OVERRIDES))
    if bad:
        raise HuggingFaceError(
            f"{path} fixes {bad[0]!r}, which cannot be overridden (only"
            f" {', '.join(fmt.OVERRIDES)} may be set)."
        )
    hf.check_fits_memory(fmt.n_params(config_json, path), path)
    try:
        cfg = fmt.config_from_hf(config_json)
    except TypeError as e:  # A value of the wrong type (a string for a size...).
        raise HuggingFaceError(f"{path} is not a {fmt.MODEL} config ({e}).") from None
    if overrides.get("block_size", 0) > cfg.block_size:
        raise HuggingFaceError(
            f"--block_size={overrides['block_size']} exceeds the model's"
            f" context of {cfg.block_size} ({path})."
        )
    cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    return cfg, fmt.params_from_hf(hf.read_weights(where), cfg)


def read_tokenizer(name_or_path: str, vocab_size: int | None = None):
    """The tokenizer of a Hugging Face model (see locate), as its family keeps it."""
    fmt, where, config_json = locate(name_or_path)
    vocab_size = vocab_size or config_json.get("vocab_size")
    return hf.load_tokenizer(where, fmt.TOKENIZER, vocab_size)


def grow_vocab(
    params: Mapping[str, Any], model_cfg: ModelConfig, vocab_size: int, key: jax.Array
) -> tuple[dict, ModelConfig]:
    """(params, model_cfg) of the same model with a vocabulary of `vocab_size`
    ids (a tokenizer that gained ids, such as the chat tokens): each parameter
    with a vocabulary axis (the token embedding, an untied output layer and its
    bias, the bigram's table) gets the new rows, drawn from `key` as the
    model's own init draws them (GPT: normal(0.02)); the existing ones are kept.
    A model that already has vocab_size ids or more is returned as it is."""
    if vocab_size <= model_cfg.vocab_size:
        return params, model_cfg
    new_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    init = lecture.make_model(new_cfg).init
    idx_BT = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(init, key, idx_BT)["params"]
    old_leaves, treedef = jax.tree.flatten(params)
    new_leaves, new_treedef = jax.tree.flatten(shapes)
    if treedef != new_treedef:
        raise ValueError(f"the parameters are not those of {model_cfg.model}'s model.")
    grown = [
        i for i, (a, b) in enumerate(zip(old_leaves, new_leaves)) if a.shape != b.shape
    ]

    def fresh(key):  # Only these leaves: XLA drops the rest of the init.
        leaves = jax.tree.leaves(init(key, idx_BT)["params"])
        return [leaves[i] for i in grown]

    leaves = list(old_leaves)
    for i, new in zip(grown, jax.jit(fresh)(key)):
        old = old_leaves[i]
        leaves[i] = new.astype(old.dtype).at[tuple(map(slice, old.shape))].set(old)
    return jax.tree.unflatten(treedef, leaves), new_cfg


def write_model(
    layout: str,
    params: Mapping[str, Any],
    cfg: ModelConfig,
    out_dir: str,
    tokenizer_files: Mapping[str, bytes | str] | None = None,
    token_ids: Mapping[str, int | None] | None = None,
) -> None:
    """Writes a folder that transformers' from_pretrained loads, in `layout`
    (a key of FORMATS): config.json, model.safetensors and `tokenizer_files`
    (name -> contents). Refuses, naming the option, a model it cannot hold."""
    fmt = FORMATS[layout]
    config_json = fmt.config_to_hf(cfg, token_ids)
    hf.write_folder(
        out_dir, config_json, fmt.params_to_hf(params, cfg), tokenizer_files
    )


def import_weights(init_from: str, overrides: Mapping[str, Any] = MappingProxyType({})):
    """(model config, parameters, tokenizer) of --init_from's Hugging Face model
    (a family FORMATS knows). `overrides` sets ModelConfig's runtime fields
    (config.RUNTIME_FIELDS) and, where the family allows it, a shorter
    block_size; everything else comes from the model's config.json."""
    try:
        fmt, where, _ = locate(init_from)
        if "block_size" not in fmt.OVERRIDES:  # Fixed by its learned positions.
            overrides = {k: v for k, v in overrides.items() if k != "block_size"}
        model_cfg, params = read_model(where, **overrides)
        tok = read_tokenizer(where, model_cfg.vocab_size)
    except ValueError as e:  # HuggingFaceError, or no GPT-2 tokenizer offline.
        raise ConfigError(f"--init_from={init_from}: {e}") from e
    logging.info(
        "%s model from %s: %d layers, %d heads (%d key/value), %d wide, context %d,"
        " vocabulary %d", fmt.MODEL, init_from, model_cfg.n_layer, model_cfg.n_head,
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


def load_local(cmd) -> tuple[ModelConfig, Any, Any]:
    """load_model for a command that talks to or scores one model (a
    cli.Command: --init_from, else --workdir's newest --checkpoint): (model
    config, whole parameters on this process, tokenizer)."""
    run = cmd.run
    if not run.init_from and not os.path.isdir(run.workdir):
        raise ConfigError(
            f"--workdir={run.workdir} does not exist: point --workdir at a training"
            " run, or pass --init_from=gpt2 (or a Hugging Face folder or Hub name)."
        )
    mesh = sharding.make_mesh(cmd.mesh.mesh_data, cmd.mesh.mesh_fsdp)
    model_cfg, params, tok = load_model(
        run, cmd.sample.checkpoint, mesh, cmd.model_overrides()
    )
    return model_cfg, hosts.to_local(params, mesh), tok
