"""Write a trained run in Hugging Face's layout, for transformers to load.

  python -m jaxgpt.hub.export --workdir=out/shakespeare --out=hf/shakespeare
  python -m jaxgpt.hub.export --workdir=out/shakespeare --checkpoint=best --out=...

then, in Python: transformers.AutoModelForCausalLM.from_pretrained("hf/shakespeare").
The folder holds config.json and model.safetensors in GPT-2's layout
(GPT2LMHeadModel, jaxgpt/hub/gpt2.py maps the parameters) for a model with GPT-2's
architecture, in Llama's (LlamaForCausalLM, jaxgpt/hub/llama.py) for one with
rotary positions, RMSNorm and SwiGLU (--format picks; a model neither holds is
refused, naming the option). Beside them, the run's tokenizer: GPT-2's as
vocab.json and merges.txt, a Llama-family model's as tokenizer.json, both of
which transformers reads; jaxgpt's own char or BPE tokenizer as
jaxgpt_tokenizer.json, which `--init_from=FOLDER` reads back. A chat model's
template goes into tokenizer_config.json ("chat_template"), so that
transformers' apply_chat_template renders conversations as the run did: a
Hugging Face tokenizer's own template, and for GPT-2 with jaxgpt's chat tokens
(added tokens there) the jinja equivalent of their rendering
(tokenizer_io.CHAT_JINJA). A char or BPE tokenizer with chat tokens stays in
jaxgpt_tokenizer.json only: transformers cannot read those tokenizers. Only
the checkpoint's parameters and meta are read.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import logging

from jaxgpt import sharding
from jaxgpt.config import ConfigError
from jaxgpt.hub import gpt2, hf, load
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import (
    cli,  # Defines the flags.
    errors,
    hosts,
    quiet,
    workdir,
)
from jaxgpt.run.configs import ExportConfig, RunConfig, SampleConfig


def check_writable(out: str) -> None:
    """Refuses an --out that cannot be written, before anything is read
    (creating nothing)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out={out} is a file: name a folder to write.")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out={out} cannot be written ({existing} is not a folder you can"
            " write to): choose another --out."
        )


def export(run: RunConfig, which: str, out: str, layout: str = "auto") -> str:
    """Writes the workdir's `which` checkpoint to `out` in `layout` (gpt2, llama or
    auto); returns how its tokenizer is stored."""
    if run.init_from:
        raise ConfigError("--init_from has nothing to export: pass --workdir of a run.")
    check_writable(out)
    mesh = sharding.make_mesh()
    model_cfg, params, tok = load.load_model(run, which, mesh)
    params = hosts.to_local(params, mesh)
    files, how = hf.tokenizer_files(tok)
    if layout == "auto":
        layout = "llama" if gpt2.architecture_choices(model_cfg) else "gpt2"
    ids = {}
    if tok.name == "hf":  # Its bos and eos, as the imported model had them.
        ids = {
            "bos_token_id": tok.token_id(tok.bos_token),
            "eos_token_id": tok.token_id(tok.eos_token),
        }
    try:
        load.write_model(layout, params, model_cfg, out, files, ids)
    except hf.HuggingFaceError as e:
        raise ConfigError(f"--workdir={run.workdir}: {e}") from e
    except OSError as e:
        full = e.errno in workdir.FULL
        space = f"; {workdir.free_space(out)} there" if full else ""
        raise ConfigError(
            f"cannot write --out={out} ({e.strerror or e}{space}): free space or"
            " choose another --out."
        ) from e
    return how


def main(argv: list[str]) -> int:
    quiet.install()  # Orbax's log lines: none, as in jaxgpt.main.
    del argv  # cli.run refuses words that are not flags.
    export_cfg = cli.from_flags(ExportConfig)
    out = export_cfg.out
    try:
        if not out:
            raise ConfigError("--out is missing: name the folder to write.")
        run = cli.from_flags(RunConfig)
        which = cli.from_flags(SampleConfig).checkpoint
        how = export(run, which, out, export_cfg.format)
    except (ConfigError, ckpt.CheckpointError) as e:
        raise SystemExit(errors.one_line(e)) from None
    except OSError as e:
        e.filename = e.filename or out
        raise SystemExit(errors.file_error_line(e, "use", "choose another --out"))
    logging.info("wrote %s: config.json, model.safetensors; %s", Path(out), how)
    print(f"tokenizer: {how}")
    return 0


if __name__ == "__main__":
    cli.run(main)
