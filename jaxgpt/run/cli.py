"""The command line: one absl flag per option of the configs (config.py, configs.py).

Every entry point (jaxgpt.main, jaxgpt.datasets.prepare, jaxgpt.hub.export, the benchmarks)
imports this module for its flags, and it is the only reader of FLAGS: the
flags are made from the config fields (`--n_layer` is ModelConfig.n_layer),
and `from_flags` builds a frozen config from their values.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, NoReturn

from absl import app, flags

from jaxgpt import config
from jaxgpt.run import configs, errors

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
        resumable = configs.free_on_resume(cls)
        for field, _ in config.flag_fields(cls):
            free = " (may change on resume)" if field.name in resumable else ""
            help_ = field.metadata["help"].replace("|", "\\|")
            lines.append(f"| `--{field.name}` | `{field.default!r}` | {help_}{free} |")
    return "\n".join(lines) + "\n"


def help_text(main_doc: str | None = None) -> str:
    """What --help prints: the program's docstring, jaxgpt's flags grouped by
    config (in docs/flags.md's order), the program's own flags, and where the
    rest are (--helpfull: absl's logging flags and the libraries')."""
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)

    def entry(flag, help_: str, choices=()) -> str:
        default = "" if flag.default is None else str(flag.default)
        default = default.lower() if isinstance(flag.default, bool) else default
        head = f"--{flag.name}={default}"
        head += f" [{'|'.join(map(str, choices))}]" if choices else ""
        return textwrap.fill(
            f"{head}  {help_}",
            width,
            initial_indent="  ",
            subsequent_indent="      ",
            break_on_hyphens=False,
        )

    lines = [
        (main_doc or "").strip(),
        "",
        "jaxgpt's flags, by config (as in docs/flags.md):",
    ]
    own = set()
    for cls in configs.ALL:
        lines += ["", f"{cls.__name__}: {cls.__doc__.strip()}"]
        for field, hint in config.flag_fields(cls):
            own.add(field.name)
            literal = typing.get_origin(hint) is Literal
            choices = typing.get_args(hint) if literal else ()
            lines.append(entry(FLAGS[field.name], field.metadata["help"], choices))
    # The program's own flags (benchmarks' --bench_*): absl files them under argv[0].
    defined_here = FLAGS.get_key_flags_for_module(sys.argv[0]) if sys.argv else []
    skip = own.union(HELP_FLAGS)
    programs = sorted((f for f in defined_here if f.name not in skip), key=str)
    if programs:
        lines += ["", "This program's own flags:"]
        lines += [entry(flag, flag.help) for flag in programs]
    rest = (
        "Also --flagfile=FILE (flags, one a line: experiments/*.cfg) and"
        " --verbosity=1 (every library's log lines); absl's and the libraries'"
        " other flags: --helpfull."
    )
    lines += ["", textwrap.fill(rest, width)]
    return "\n".join(lines).lstrip("\n") + "\n"


HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "only_check_args", "?")


class Help(app.HelpFlag):
    """--help (-?, --helpshort): help_text() on stdout, exit 0."""

    def parse(self, arg) -> None:
        if self._parse(arg):
            main = sys.modules.get("__main__")
            print(help_text(getattr(main, "__doc__", None)), end="")
            sys.exit(0)


class HelpShort(Help):
    NAME, SHORT_NAME = "helpshort", None


def install_help() -> None:
    """Replaces absl's --help (the main module's flags only, which are none in
    jaxgpt.main, and exit 1) with Help. Installing twice changes nothing."""
    app.define_help_flags()  # absl's, which app.run would define later.
    for flag_cls in (Help, HelpShort):
        if isinstance(FLAGS[flag_cls.NAME], flag_cls):
            continue
        names = [flag_cls.NAME] + ([flag_cls.SHORT_NAME] if flag_cls.SHORT_NAME else [])
        for name in names:
            delattr(FLAGS, name)
        flags.DEFINE_flag(flag_cls())


install_help()


@dataclasses.dataclass(frozen=True)
class Command:
    """What the command line says, read once by an entry point and passed down:
    every config, ModelConfig's flag values (its vocab_size comes from the
    tokenizer) and the names of the flags the user set (for "the checkpoint's
    value unless the user gave one")."""

    run: configs.RunConfig
    data: configs.DataConfig
    train: config.TrainConfig
    loop: configs.LoopConfig
    sample: configs.SampleConfig
    mesh: configs.MeshConfig
    eval: configs.EvalConfig
    chat: configs.ChatConfig
    model: Mapping[str, Any]
    given: frozenset[str]

    def model_config(self, **fields: Any) -> config.ModelConfig:
        """The flags' ModelConfig, with `fields` (vocab_size) added."""
        return config.ModelConfig(**self.model, **fields)

    def runtime(self) -> dict[str, Any]:
        """ModelConfig's runtime options (config.RUNTIME_FIELDS), as the flags say."""
        return {name: self.model[name] for name in config.RUNTIME_FIELDS}

    def model_overrides(self) -> dict[str, Any]:
        """What the flags set on an imported model (hub.load): its runtime
        options, and --block_size where given."""
        block = {"block_size": self.model["block_size"]}
        return {**self.runtime(), **(block if "block_size" in self.given else {})}


def command() -> Command:
    """The command line's Command (flags parsed)."""
    model = {
        f.name: FLAGS[f.name].value for f, _ in config.flag_fields(config.ModelConfig)
    }
    names = [f.name for cls in configs.ALL for f, _ in config.flag_fields(cls)]
    return Command(
        run=from_flags(configs.RunConfig),
        data=from_flags(configs.DataConfig),
        train=from_flags(config.TrainConfig),
        loop=from_flags(configs.LoopConfig, max_iters=FLAGS.max_iters),
        sample=from_flags(configs.SampleConfig),
        mesh=from_flags(configs.MeshConfig),
        eval=from_flags(configs.EvalConfig),
        chat=from_flags(configs.ChatConfig),
        model=types.MappingProxyType(model),
        given=frozenset(n for n in names if not FLAGS[n].using_default_value),
    )


def flag_names() -> list[str]:
    """Every flag's name, and --noNAME for the booleans."""
    names = list(FLAGS)
    return names + [f"no{n}" for n in names if FLAGS[n].boolean]


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, each refusal one `error:` line: an unknown flag
    (with the nearest name), a flagfile that cannot be read, a bad value, or
    words that are not flags (exit 1)."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        sys.exit(errors.flag_error_line(e, flag_names()))
    if len(rest) > 1:
        sys.exit(errors.unexpected_arguments_line(rest[1:]))
    return rest


def run(main: Callable[[list[str]], Any]) -> NoReturn:
    """absl's app.run(main), the command line parsed by parse_flags: what
    every absl entry point calls."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    print(markdown(), end="")
