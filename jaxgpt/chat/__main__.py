"""Chat with a model in the terminal: replies stream as they are sampled.

  python -m jaxgpt.chat --workdir=out/chat_sft
  python -m jaxgpt.chat --init_from=HuggingFaceTB/SmolLM2-135M-Instruct --temperature=0.7

The model is --init_from's (GPT-2, a Llama-family folder or Hub name) or the
newest --checkpoint in --workdir, with its chat template (a model without one
continues the text). --temperature, --top_p, --top_k, --max_new_tokens,
--system and --seed set the start; commands change them as you go (/help).
"""

from __future__ import annotations

from jaxgpt.run import stops

if __name__ == "__main__":  # Ctrl-C while JAX is imported ends quietly too.
    stops.quit_at_once()

from jaxgpt.chat import model as chat_model
from jaxgpt.chat import terminal
from jaxgpt.chat.engine import Engine
from jaxgpt.config import ConfigError
from jaxgpt.run import cache, cli, errors, quiet
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.perf import cpu_speedups


def main(argv: list[str]) -> int:
    quiet.install()  # Other libraries' log lines: one line each, orbax's none.
    cpu_speedups()  # Before XLA allocates and compiles (run/perf.py).
    cache.enable_compilation_cache()  # A second start loads its compiled programs.
    del argv  # cli.run refuses words that are not flags.
    with stops.QuitAtOnce():  # Loading: a signal ends at once.
        try:
            cmd = cli.command()
            model = chat_model.load(cmd)
            settings = terminal.initial_settings(
                cmd.sample, cmd.chat.system, cmd.given, model.context
            )
        except (ConfigError, ckpt.CheckpointError) as e:
            errors.exit_with(e)
        except OSError as e:
            errors.exit_with(e, cli.FLAGS.workdir)
    engine = Engine(model, slots=1)
    try:
        return terminal.run(model, engine, settings, cmd.run.seed)
    finally:
        engine.close()


if __name__ == "__main__":
    cli.run(main)
