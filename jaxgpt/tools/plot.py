"""Loss curves of one or several runs, from their metrics.jsonl.

  python -m jaxgpt.tools.plot out/shakespeare_cpu                 # out/shakespeare_cpu/loss.png
  python -m jaxgpt.tools.plot out/char out/bpe --bpb --out=cmp.png

One color per run: val loss solid, train loss dashed, at each evaluation.
Each run is labelled with its folder's name and its model (from the config
saved beside its checkpoints). The loss is in nats per token, which depends on
the tokenizer: --bpb plots bits per byte of text instead, the measure that
compares a character-level run with a BPE one. The image goes beside the first
run unless --out names it. Runs that scored downstream tasks
(--eval_tasks=hellaswag) get a second panel: acc_norm solid, acc dotted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # No pyplot: no backend, no display needed.

from jaxgpt.run import errors, quiet, workdir


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The evaluations of a run, by step (a step evaluated twice keeps its last)."""
    path = Path(run) / workdir.METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} a run's --workdir?")
    records = {record["step"]: record for record in workdir.read_metrics(path)}
    return [records[step] for step in sorted(records)]


METRICS = {  # What --bpb chooses: the records' keys, and the axis' label.
    "loss": ("loss", "loss (nats per token)"),
    "bpb": ("bpb", "bits per byte (of UTF-8 text)"),
}


# The sizes each --model uses (it ignores the others); every other model: all four.
SIZES = {
    "bigram": (),
    "lecture_head": ("n_embd", "block_size"),
    "lecture_heads": ("n_head", "n_embd", "block_size"),
    "lecture_ffwd": ("n_head", "n_embd", "block_size"),
}
UNITS = {"n_layer": "L", "n_head": "H", "n_embd": "C", "block_size": "T"}


def describe(model: dict[str, Any]) -> str:
    """A model config in a few words: 'gpt 4L 4H 128C 64T'."""
    sizes = SIZES.get(model["model"], tuple(UNITS))
    return " ".join([model["model"], *(f"{model[k]}{UNITS[k]}" for k in sizes)])


def label(run: str | Path) -> str:
    """The run's folder name and its model, read from its checkpoint's meta."""
    from jaxgpt.run import checkpoint  # Orbax: imported only to read a label.

    name = Path(run).resolve().name
    try:
        meta = checkpoint.read_meta(run)
    except (OSError, ValueError, KeyError):
        meta = None
    return f"{name}: {describe(meta['model'])}" if meta else name


def draw(
    ax,
    runs: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    logx: bool = False,
    metric: str = "loss",
):
    """Draws the runs' train (dashed) and val (solid) `metric` ("loss" or "bpb")
    on `ax`; with `logx`, steps on a log scale (for runs of very different
    lengths)."""
    key, axis_label = METRICS[metric]
    labels = list(labels) if labels else [label(run) for run in runs]
    for i, (run, name) in enumerate(zip(runs, labels)):
        records, color = read_metrics(run), f"C{i % 10}"
        if any(f"val_{key}" not in r or f"train_{key}" not in r for r in records):
            raise ValueError(f"{run}'s metrics.jsonl has no train_{key}/val_{key}.")
        steps = [r["step"] for r in records]
        ax.plot(steps, [r[f"val_{key}"] for r in records], color=color, label=name)
        ax.plot(steps, [r[f"train_{key}"] for r in records], color=color, ls="--")
    if logx:
        ax.set_xscale("symlog", linthresh=100)  # Linear up to step 100 (and 0).
    ax.set_xlabel("step")
    ax.set_ylabel(axis_label)
    ax.grid(alpha=0.3)
    ax.legend(title=f"val {key} (dashed: train)", fontsize="small")
    return ax


def task_metrics(runs: Sequence[str | Path]) -> list[str]:
    """The downstream tasks the runs scored ("hellaswag", ...)."""
    return sorted(
        {
            name.removesuffix("_acc_norm")
            for run in runs
            for record in read_metrics(run)
            for name in record
            if name.endswith("_acc_norm")
        }
    )


def draw_tasks(ax, runs: Sequence[str | Path], labels: Sequence[str], logx=False):
    """Draws the runs' task accuracies on `ax`: acc_norm solid, acc dotted."""
    for i, (run, name) in enumerate(zip(runs, labels)):
        records, color = read_metrics(run), f"C{i % 10}"
        for task in task_metrics([run]):
            scored = [r for r in records if f"{task}_acc_norm" in r]
            steps = [r["step"] for r in scored]
            ax.plot(
                steps,
                [r[f"{task}_acc_norm"] for r in scored],
                color=color,
                label=f"{name}: {task}",
            )
            ax.plot(steps, [r[f"{task}_acc"] for r in scored], color=color, ls=":")
    if logx:
        ax.set_xscale("symlog", linthresh=100)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(title="acc_norm (dotted: acc)", fontsize="small")
    return ax


def plot(
    runs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    logx: bool = False,
    metric: str = "loss",
) -> Path:
    """Writes the runs' curves of `metric` (and task accuracies, if they scored
    any) to the image `out` (its suffix: png, svg, pdf)."""
    labels = list(labels) if labels else [label(run) for run in runs]
    tasks = bool(task_metrics(runs))
    fig = Figure(figsize=(14, 5) if tasks else (8, 5))
    axes = fig.subplots(1, 2) if tasks else [fig.subplots()]
    draw(axes[0], runs, labels, logx, metric)
    if tasks:
        draw_tasks(axes[1], runs, labels, logx)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = errors.ArgumentParser(
        prog="python -m jaxgpt.tools.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="+", help="Workdirs of runs (--workdir).")
    parser.add_argument(
        "--out",
        default=None,
        help="The image to write (default: loss.png, or bpb.png with --bpb, in the"
        " first run's folder).",
    )
    parser.add_argument(
        "--bpb",
        action="store_true",
        help="Bits per byte instead of the loss per token: compares runs of"
        " different tokenizers (characters and BPE).",
    )
    parser.add_argument("--title", default=None, help="A title above the plot.")
    parser.add_argument("--logx", action="store_true", help="Steps on a log scale.")
    args = parser.parse_args(argv)
    quiet.install()  # Labels read the runs' checkpoints: no orbax lines.
    metric = "bpb" if args.bpb else "loss"
    out = args.out or Path(args.runs[0]) / f"{metric}.png"
    try:
        out = plot(args.runs, out, title=args.title, logx=args.logx, metric=metric)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(errors.one_line(e))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
