"""The command line: one absl flag per option of the configs (config.py, configs.py).

Every entry point (jaxgpt.main, jaxgpt.datasets.prepare, jaxgpt.hub.export, the benchmarks)
imports this module for its flags, and it is the only reader of FLAGS: the
flags are made from the config fields (`--n_layer` is ModelConfig.n_layer),
and `from_flags` builds a frozen config from their values.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from absl import flags

from jaxgpt import config
from jaxgpt.run import configs

FLAGS = flags.FLAGS


def define_flags(cls: type) -> None:
    """One absl flag per option of `cls`: its name, type, default and help."""
    for field, hint in config.flag_fields(cls):
        name, default, help_ = field.name, field.default, field.metadata["help"]
        if typing.get_origin(hint) is Literal:
            flags.DEFINE_enum(name, default, list(typing.get_args(hint)), help_)
            continue
        if isinstance(hint, types.UnionType):  # `int | None`: an optional int.
            (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
        define = {
            bool: flags.DEFINE_bool,
            int: flags.DEFINE_integer,
            float: flags.DEFINE_float,
            str: flags.DEFINE_string,
        }[hint]
        define(name, default, help_)


for _cls in configs.ALL:
    define_flags(_cls)


def from_flags(cls: type, **given: Any):
    """The config `cls` built from the flags' values (and `given` non-flag fields)."""
    values = {
        field.name: FLAGS[field.name].value for field, _ in config.flag_fields(cls)
    }
    return cls(**values, **given)


def markdown() -> str:
    """Every flag as a markdown table per config: docs/flags.md is this text
    (`python -m jaxgpt.run.cli > docs/flags.md`; a test keeps them equal)."""
    lines = [
        "# Every flag",
        "",
        "Made from the config dataclasses in `jaxgpt/config.py` (the core's) and"
        + " `jaxgpt/run/configs.py` (the engine's), the one definition of"
        + " each option; regenerate with `python -m jaxgpt.run.cli > docs/flags.md`.",
    ]
    for cls in configs.ALL:
        lines += ["", f"## {cls.__name__}: {cls.__doc__.strip()}", ""]
        lines += ["| flag | default | |", "|---|---|---|"]
        for field, _ in config.flag_fields(cls):
            free = " (may change on resume)" if field.metadata["free_on_resume"] else ""
            help_ = field.metadata["help"].replace("|", "\\|")
            lines.append(f"| `--{field.name}` | `{field.default!r}` | {help_}{free} |")
    return "\n".join(lines) + "\n"


def given(*names: str) -> dict[str, Any]:
    """The flags among `names` that the command line (or a flagfile) set."""
    return {
        name: FLAGS[name].value for name in names if not FLAGS[name].using_default_value
    }


def runtime_options() -> dict[str, Any]:
    """The ModelConfig fields that change how, not what, the model computes."""
    return {name: FLAGS[name].value for name in config.RUNTIME_FIELDS}


def model_overrides() -> dict[str, Any]:
    """What the flags set on an imported model (hub.load): its runtime options,
    and --block_size where given."""
    return {**runtime_options(), **given("block_size")}


if __name__ == "__main__":
    print(markdown(), end="")
