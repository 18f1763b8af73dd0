"""The `python -m jaxgpt...` commands of README.md's and docs/*.md's code
blocks, as written: each names a module that exists and flags that parse
(absl's for the commands that read run/cli.py's flags, the module's own
argparse parser for the others) into valid configs; read in order (README.md,
then each doc after it), each reads only runs that an earlier command made,
trains no run into a folder that an earlier command trained with another
model, and writes only where git ignores; and the cheap ones run, in order,
with tiny sizes appended, in a scratch folder (the reasons for the others are
listed in `skip_reason`)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from absl.testing import flagsaver
from conftest import REPO

from jaxgpt.config import RUNTIME_FIELDS, ConfigError, ModelConfig
from jaxgpt.run import cli, configs
from jaxgpt.run.configs import LoopConfig

FLAGS = flags.FLAGS
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
# The modules whose flags are cli's.
ABSL = {
    "jaxgpt.main", "jaxgpt.hub.export", "jaxgpt.datasets.prepare", "jaxgpt.serve",
    "jaxgpt.chat", "jaxgpt.evals.generation", "jaxgpt.tools.grpo",
}  # fmt: skip
PLACEHOLDER = re.compile(r"\.\.\.|path/to/|\$")

# Appended to each run of jaxgpt.main: a model and a run of seconds.
TINY = [
    "--max_iters=2",
    "--lr_decay_iters=2",
    "--warmup_iters=0",
    "--eval_interval=2",
    "--eval_iters=1",
    "--log_interval=1",
    "--n_layer=1",
    "--n_embd=16",
    "--n_head=2",
    "--block_size=16",
    "--batch_size=2",
    "--grad_accum_steps=1",
    "--max_new_tokens=8",
    "--num_samples=1",
    "--peak_tflops=1",  # No peak measurement.
]


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    line: int
    module: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: python -m {self.module} {' '.join(self.args)}"


def extract(doc: str, text: str) -> list[Command]:
    """The `python -m jaxgpt.X ...` commands of `text`'s fenced code blocks
    (lines joined at a trailing backslash, comments and shell around them left out)."""
    found, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        if "python" not in logical:  # Prose in a block (a tree, output) lexes badly.
            continue
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
        for i, token in enumerate(tokens[:-2]):
            if token == "python" and tokens[i + 1] == "-m":
                module = tokens[i + 2]
                if module.startswith("jaxgpt"):
                    args = []
                    for arg in tokens[i + 3 :]:
                        if arg in {";", "&", "&&", "|", "||"}:
                            break
                        args.append(arg)
                    found.append(Command(doc, start, module, tuple(args)))
    return found


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in extract(doc, (REPO / doc).read_text())]


COMMANDS = all_commands()


def absl_flags(command: Command) -> dict[str, object]:
    """`command`'s flags parsed by absl from the repository root (placeholder
    values left out, their flags' names checked): the configs and the flags'
    values. Raises on an unknown flag, a bad value or an invalid
    config."""
    args = []
    for arg in command.args:
        name = arg.lstrip("-").split("=")[0]
        if arg.startswith("--"):
            known = name in FLAGS or (name.startswith("no") and name[2:] in FLAGS)
            known = known or name == "flagfile"  # absl reads it itself.
            assert known, f"{command}: --{name} is no flag"
        if not PLACEHOLDER.search(arg):
            args.append(arg)
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["prog", *args])
        built = {}
        for cls in configs.ALL:
            try:
                given = {  # As main.
                    ModelConfig: {"vocab_size": 1},
                    LoopConfig: {"max_iters": FLAGS.max_iters},
                }.get(cls, {})
                built[cls.__name__] = cli.from_flags(cls, **given)
            except ConfigError as e:
                if not PLACEHOLDER.search(" ".join(command.args)):
                    raise AssertionError(f"{command}: {e}") from None
        return {"configs": built, "values": FLAGS.flag_values_dict()}


class Parsed(Exception):
    """An argparse parser's result, raised before the command does any work."""

    def __init__(self, result):
        super().__init__()
        self.result = result


@pytest.fixture
def argparse_only(monkeypatch):
    patch_argparse(monkeypatch)


def patch_argparse(monkeypatch) -> None:
    """Calls of ArgumentParser.parse_args/parse_known_args raise Parsed (after
    parsing, so that a bad argument still exits with argparse's error)."""
    parse_args, parse_known = (
        argparse.ArgumentParser.parse_args,
        argparse.ArgumentParser.parse_known_args,
    )
    depth = [0]

    def wrapped_args(self, *a, **k):
        depth[0] += 1
        try:
            result = parse_args(self, *a, **k)
        finally:
            depth[0] -= 1
        raise Parsed(result)

    def wrapped_known(self, *a, **k):
        result = parse_known(self, *a, **k)
        if depth[0]:
            return result
        raise Parsed(result)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", wrapped_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", wrapped_known)


def argparse_args(command: Command, monkeypatch):
    """`command`'s arguments as its module's parser reads them (a Namespace, or
    (Namespace, extra) for parse_known_args)."""
    module = importlib.import_module(command.module)
    try:
        if command.module == "jaxgpt.evals.harness":
            from lm_eval.__main__ import HarnessCLI

            monkeypatch.setattr(sys, "argv", ["lm_eval", *command.args])
            HarnessCLI().parse_args()
        else:
            module.main(list(command.args))
    except Parsed as parsed:
        return parsed.result
    except SystemExit as e:
        raise AssertionError(f"{command}: its parser refused it ({e})") from None
    raise AssertionError(f"{command}: parsed no arguments")


def test_the_docs_hold_the_commands():
    """The extraction finds the commands (a format change would leave nothing
    to test): the quick start's, continued lines, and one in a shell loop."""
    text = "\n".join(str(c) for c in COMMANDS)
    assert "README.md:" in text and len(COMMANDS) >= 30
    assert "jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg\n" in text + "\n"
    assert any(c.args[-1:] == ("--checkpoint=best",) for c in COMMANDS)  # Continued.
    assert any("--process_id=$i" in c.args for c in COMMANDS)  # for ...; do ... & done


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_each_command_names_a_module_and_flags_that_exist(
    command, monkeypatch, argparse_only
):
    assert importlib.util.find_spec(command.module), f"{command}: no such module"
    monkeypatch.chdir(REPO)  # Flagfiles are named from the repository root.
    if command.module in ABSL:
        absl_flags(command)
    else:
        argparse_args(command, monkeypatch)


def reads_and_writes(
    command: Command, monkeypatch
) -> tuple[dict, list[str], list[str]]:
    """(runs trained: workdir -> model, runs read, paths written) of `command`."""
    trained, read, written = {}, [], []
    if command.module in ABSL:
        parsed = absl_flags(command)
        values, built = parsed["values"], parsed["configs"]
        workdir = values["workdir"]
        if command.module == "jaxgpt.main":
            if values["mode"] == "train":
                model = built.get("ModelConfig")
                arch = {
                    f.name: getattr(model, f.name)
                    for f in dataclasses.fields(ModelConfig)
                    if model is not None and f.name not in RUNTIME_FIELDS
                }
                trained[workdir] = (values["init_from"], arch)
                written.append(workdir)
            elif not values["init_from"]:
                read.append(workdir)
        elif command.module == "jaxgpt.hub.export":
            read.append(workdir)
            written.append(values["out"])
    elif command.module == "jaxgpt.tools.plot":
        args = argparse_args(command, monkeypatch)
        read += args.runs
        written += [args.out] if args.out else []
    elif command.module == "jaxgpt.tools.ladder":
        args, extra = argparse_args(command, monkeypatch)
        extra = tuple(a for a in extra if a != "--")
        for name in [n for s in ladder_steps() for n in (s.name, s.cpu_name) if n]:
            flagfile = f"--flagfile=experiments/lecture/{name}.cfg"
            step = Command(command.doc, command.line, "jaxgpt.main", (flagfile, *extra))
            step_args = (*step.args, f"--workdir={args.out}/{name}")
            trained |= reads_and_writes(
                dataclasses.replace(step, args=step_args), monkeypatch
            )[0]
        written.append(args.out)
    elif command.module == "jaxgpt.evals.harness":
        args = argparse_args(command, monkeypatch)
        from lm_eval.api import registry

        assert registry.get_model(args.model), f"{command}: no model {args.model}"
        model_args = args.model_args or {}
        if isinstance(model_args, str):  # lm_eval before 0.4.10: "k=v,k=v".
            model_args = dict(kv.split("=", 1) for kv in model_args.split(","))
        read += [model_args["workdir"]] if "workdir" in model_args else []
    elif command.module == "jaxgpt.datasets.chat_tasks":
        written.append(argparse_args(command, monkeypatch).out)
    return trained, read, written


def ladder_steps():
    from jaxgpt.tools import ladder

    return ladder.STEPS


def order_problems(commands: list[Command], monkeypatch) -> list[str]:
    """What goes wrong running `commands` in order: README.md's first, then
    each doc's after README.md's (a doc may rely on the quick start, not on
    another doc)."""
    problems, readme = [], {}

    def walk(sequence, made):
        for command in sequence:
            if PLACEHOLDER.search(" ".join(command.args)):
                continue  # The reader fills it in.
            trained, read, written = reads_and_writes(command, monkeypatch)
            for workdir in read:
                if Path(workdir).as_posix() not in made:
                    problems.append(
                        f"{command}: reads {workdir}, which no earlier command made"
                    )
            for workdir, model in trained.items():
                key = Path(workdir).as_posix()
                if key in made and made[key][1] != model:
                    problems.append(
                        f"{command}: trains another model into {workdir}, which"
                        f" {made[key][0]} trained: refused"
                    )
                made.setdefault(key, (command, model))
            for path in written:
                ignored = subprocess.run(
                    ["git", "check-ignore", "-q", "--no-index", f"{path}/"],
                    cwd=REPO,
                    check=False,
                )
                if ignored.returncode != 0:
                    problems.append(
                        f"{command}: writes {path}, which git does not ignore"
                    )
        return made

    monkeypatch.chdir(REPO)
    readme = walk([c for c in commands if c.doc == "README.md"], {})
    for doc in DOCS[1:]:
        walk([c for c in commands if c.doc == doc], dict(readme))
    return problems


def test_commands_in_order_read_what_earlier_ones_made(monkeypatch, argparse_only):
    problems = order_problems(COMMANDS, monkeypatch)
    assert not problems, "\n".join(problems)


def test_the_order_check_finds_a_reused_workdir_a_missing_run_and_a_tracked_output(
    monkeypatch, argparse_only
):
    readme = """```
python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg
```"""
    doc = """```
python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg --position=rope
python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg --max_iters=5000
python -m jaxgpt.tools.plot out/shakespeare_cpu out/lecture/6_layernorm --out=cmp.png
python -m jaxgpt.evals.harness --model jaxgpt --model_args workdir=out/nowhere --tasks x
```"""
    commands = extract("README.md", readme) + extract(DOCS[1], doc)
    problems = order_problems(commands, monkeypatch)
    assert len(problems) == 4, problems
    assert (
        "--position=rope: trains another model into out/shakespeare_cpu" in problems[0]
    )
    assert "reads out/lecture/6_layernorm, which no earlier command made" in problems[1]
    assert "writes cmp.png, which git does not ignore" in problems[2]
    assert "reads out/nowhere, which no earlier command made" in problems[3]


def test_a_renamed_flag_a_bad_value_or_a_missing_module_is_caught(monkeypatch):
    monkeypatch.chdir(REPO)
    for args in [("--n_layers=2",), ("--mode=serve",), ("--warmup_iters=5000",)]:
        with pytest.raises(Exception):  # noqa: B017  (absl's or a config's error)
            absl_flags(Command("README.md", 1, "jaxgpt.main", args))
    assert importlib.util.find_spec("jaxgpt.speedups") is None


def skip_reason(command: Command, made: set[str]) -> str | None:
    """Why `command` is not run here (None: it is), given the runs `made` so far."""
    if PLACEHOLDER.search(" ".join(command.args)):
        return "a placeholder for the reader's own value"
    if command.module == "jaxgpt.evals.harness":
        return "needs the network (the tasks' data)"
    if command.module == "jaxgpt.serve":
        return "a server: it runs until stopped (tests/test_serve.py runs it)"
    if command.module == "jaxgpt.chat":
        return "reads the terminal (tests/test_chat_terminal.py runs it)"
    if command.module == "jaxgpt.evals.generation":
        return "scores a fine-tuned run (tests/test_generation.py runs the command)"
    if command.module == "jaxgpt.tools.grpo":
        return "learns from a fine-tuned run's rewards (tests/test_grpo.py runs it)"
    if command.module == "jaxgpt.tools.ladder":
        return "trains every lecture step in turn: minutes even at tiny sizes"
    if command.module.startswith("jaxgpt.micrograd"):
        return "pure-Python training: half a minute (tests/test_micrograd_*.py)"
    if command.module == "jaxgpt.tools.plot":
        runs = [a for a in command.args if not a.startswith("--")]
        return None if set(runs) <= made else "plots a run that a skipped command makes"
    if command.module not in ABSL:
        return None
    values = absl_flags(command)["values"]
    if values["tasks"] or values["eval_tasks"]:
        return "needs the network (the tasks' data)"
    if values["init_from"] and not Path(values["init_from"]).exists():
        return f"needs the network (--init_from={values['init_from']} from the Hub)"
    if values["data_path"]:
        return "reads the reader's own files"
    if values["dataset"] != "shakespeare_char":
        return f"needs the network (--dataset={values['dataset']}: its text or GPT-2's tokenizer)"
    if values["mesh_fsdp"] * (values["mesh_data"] or 1) > 1:
        return "needs 8 GPUs"
    if command.module == "jaxgpt.hub.export" and values["workdir"] not in made:
        return "exports a run that a skipped command makes"
    return None


def test_the_cheap_commands_run_in_order_with_tiny_sizes(
    tmp_path, monkeypatch, corpus_path, capsys
):
    """README.md's commands, then the docs', each as written with TINY (and the
    test corpus) appended to jaxgpt.main's, in a scratch folder that holds
    the checkout's experiments/: what one writes, the next reads."""
    from jaxgpt import main
    from jaxgpt.datasets import chat_tasks
    from jaxgpt.hub import export
    from jaxgpt.tools import plot

    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    monkeypatch.chdir(tmp_path)
    ran, skipped, made = [], {}, set()
    seen = set()
    for command in COMMANDS:
        reason = skip_reason(command, made)
        if (command.module, command.args) in seen:  # README's, again in a doc.
            reason = "the same command ran above"
        seen.add((command.module, command.args))
        if reason:
            skipped[str(command)] = reason
            continue
        args = list(command.args)
        if command.module in ABSL:
            extra = [*TINY, f"--data_path={corpus_path}"]
            with flagsaver.flagsaver():
                FLAGS.unparse_flags()
                FLAGS(
                    ["prog", *args, *(extra if command.module == "jaxgpt.main" else [])]
                )
                entry = main.main if command.module == "jaxgpt.main" else export.main
                assert entry(["prog"]) in (0, None), str(command)
                if command.module == "jaxgpt.main" and FLAGS.mode == "train":
                    made.add(Path(FLAGS.workdir).as_posix())
        elif command.module == "jaxgpt.tools.plot":
            assert plot.main(args) == 0, str(command)
        elif command.module == "jaxgpt.datasets.chat_tasks":
            chat_tasks.main(args)
        else:
            raise AssertionError(f"{command}: no way to run it here")
        ran.append(str(command))
    out = capsys.readouterr()
    print(
        "\n".join(
            ["ran:", *ran, "skipped:", *(f"{c}: {r}" for c, r in skipped.items())]
        )
    )
    assert "error:" not in out.err, out.err[-2000:]
    assert any("jaxgpt.tools.plot" in c for c in ran) and any(
        "export" in c for c in ran
    )
    assert (tmp_path / "hf/llama_style/config.json").is_file()
    assert (tmp_path / "out/shakespeare_cpu/loss.png").is_file()
