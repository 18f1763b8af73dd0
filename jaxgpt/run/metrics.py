"""What a training run reports, and where.

On a terminal, a progress bar (steps done of the total, time left, loss and
tokens/s); after the run's first step a line with its time, which holds the
compilation (the ms/step of later lines leave it out); every --log_interval
steps a line with the loss, learning rate, ms/step, tokens/s, model FLOP/s,
MFU, steps done of the total and the time left; and at every evaluation a
line that is also appended to <workdir>/metrics.jsonl as one JSON record.
Lines are `HH:MM:SS message`, as jaxgpt's log lines (run/quiet.py). With
--tensorboard, the same figures (and the gradient norm, and a sample of text
at each evaluation) also go to TensorBoard event files in the workdir:
`tensorboard --logdir out` shows every run under out/. In a multi-process
run, process 0 alone writes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from absl import logging
from tqdm import tqdm

from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import hosts, perf, quiet
from jaxgpt.run import workdir as workdir_lib
from jaxgpt.run.configs import LoopConfig
from jaxgpt.run.perf import flops_per_token


class TrainLog:
    """The log of one training run from `start_step` on.

    ms/step counts training steps only: the time of evaluations is left out,
    and so is the run's first step (its compilation), reported on its own.
    The time left is the wall time per step since the first step (evaluations
    and saves included) times the steps to go. MFU is per device: model
    FLOP/s / (peak_flops of one device x devices), see perf.mfu.
    """

    def __init__(
        self,
        workdir: str | Path,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        loop_cfg: LoopConfig,
        schedule: Callable[[int], float],
        start_step: int,
        peak_flops: float | None = None,
        devices: int = 1,
        tensorboard: bool = False,
    ):
        self.path = Path(workdir) / workdir_lib.METRICS_NAME
        self.cfg, self.schedule = loop_cfg, schedule
        self.tokens_per_step = train_cfg.batch_size * model_cfg.block_size
        self.flops_per_token = flops_per_token(model_cfg)
        self.peak_flops, self.devices = peak_flops, devices
        self.is_main = hosts.is_main_process()
        self.bar = tqdm(
            total=loop_cfg.end_step,
            initial=start_step,
            desc="train",
            unit="step",
            disable=None if self.is_main else True,  # None: only on a terminal.
            dynamic_ncols=True,
        )
        self.first: tuple[float, int] | None = None  # (time, step) after step 1.
        self._restart_clock(start_step)
        self.board = (
            open_board(self.path.parent, start_step)
            if tensorboard and self.is_main
            else None
        )
        self._sample: str | None = None

    def _restart_clock(self, step: int) -> None:
        self.t_last, self.step_last = time.perf_counter(), step

    def say(self, text: str) -> None:
        """`text` as a log line (`HH:MM:SS text`) on stderr, above the bar."""
        if self.is_main:
            tqdm.write(quiet.stamp(text), file=sys.stderr)

    def step(self, step: int, metrics: dict) -> None:
        """After training step `step`: after the run's first, a line with its
        time (compilation included); every log_interval steps, a log line."""
        self.bar.update(1)
        if self.first is None:
            self._first_step(step, metrics)
            return
        if step % self.cfg.log_interval and step != self.cfg.end_step:
            return
        loss = float(metrics["loss"])  # Waits for the step to finish.
        now = time.perf_counter()
        dt = (now - self.t_last) / (step - self.step_last)
        self._restart_clock(step)
        tokens_per_s = self.tokens_per_step / dt
        lr = float(self.schedule(step - 1))
        line = (
            f"step {step}: loss {loss:.4f}, lr {lr:.2e},"
            f" {1e3 * dt:.1f} ms/step, {tokens_per_s:,.0f} tok/s"
        )
        scalars = {"train/loss": loss, "train/lr": lr}
        if "grad_norm" in metrics:
            scalars["train/grad_norm"] = float(metrics["grad_norm"])
        scalars |= {"perf/ms_per_step": 1e3 * dt, "perf/tokens_per_s": tokens_per_s}
        if self.flops_per_token:
            line += f", {self.flops_per_token * tokens_per_s / 1e9:.1f} GFLOP/s"
            if self.peak_flops:
                mfu = perf.mfu(
                    self.flops_per_token, tokens_per_s, self.peak_flops, self.devices
                )
                line += f", MFU {100 * mfu:.1f}%"
                scalars["perf/mfu"] = mfu
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        self.say(line + "; " + self.progress(step, now))
        self._write_scalars(step, scalars)

    def _first_step(self, step: int, metrics: dict) -> None:
        """The run's first step: its time holds the compilation (or the load of
        the compiled program from the cache), so it is reported apart."""
        loss = float(metrics["loss"])  # Waits for the step to finish.
        now = time.perf_counter()
        seconds = now - self.t_last
        self.first = (now, step)
        self._restart_clock(step)
        self.bar.set_postfix(loss=f"{loss:.4f}")
        self.say(
            f"step {step}: loss {loss:.4f}, first step {seconds:.1f} s (compile"
            " included; ms/step leaves it out); " + self.progress(step, now)
        )

    def progress(self, step: int, now: float) -> str:
        """`40/5000 steps (1%), 1:02:03 left` (time left from the second step)."""
        end, (t_first, step_first) = self.cfg.end_step, self.first
        text = f"{step}/{end} steps ({step / max(end, 1):.0%})"
        if step > step_first:
            left = (now - t_first) / (step - step_first) * (end - step)
            text += f", {tqdm.format_interval(left)} left"
        return text

    def evaluation(self, step: int, losses: dict[str, float]) -> None:
        """The losses (and task accuracies) of the evaluation at `step`: a log
        line and a metrics.jsonl record."""
        record = {"step": step, **losses, "lr": float(self.schedule(step))}
        if self.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        line = (
            f"step {step}: train loss {losses['train_loss']:.4f},"
            f" val loss {losses['val_loss']:.4f}"
        )
        if "val_bpb" in losses:
            line += f", val {losses['val_bpb']:.4f} bits/byte"
        for name, value in losses.items():  # Downstream tasks: hellaswag_acc_norm...
            if name.endswith(("_acc", "_acc_norm")):
                line += f", {name.replace('_', ' ', 1)} {value:.4f}"
        self.say(line)
        self._write_scalars(step, {f"eval/{k}": v for k, v in losses.items()})
        if self.board is not None:
            if self._sample is not None:  # Fenced: TensorBoard renders markdown.
                self.board.add_text("sample", f"```\n{self._sample}\n```", step)
            self.board.flush()
        self._sample = None
        self._restart_clock(step)  # Evaluations are not training steps.

    def add_sample(self, text: str | None) -> None:
        """A sample of the model's text, shown with the coming evaluation."""
        self._sample = text

    def _write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.board is not None:
            for tag, value in scalars.items():
                self.board.add_scalar(tag, float(value), step)

    def close(self, step: int, stopped_by: str | None) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()
        if stopped_by and self.is_main:
            logging.info(
                "stopped at step %d (%s); checkpoint saved in %s: run the same"
                " command again to resume.",
                step,
                stopped_by,
                self.path.parent,
            )


# tensorboardX imports these, when installed, for features jaxgpt does not use
# (torch tensors, event files on S3 or GCS): torch alone adds a second to every
# start-up. jaxgpt writes numbers and text to a local workdir.
_NOT_FOR_TENSORBOARD = ("torch", "boto3", "botocore", "google.cloud")


def import_summary_writer():
    """tensorboardX's SummaryWriter, imported without torch, boto3 or GCS."""
    if "tensorboardX" in sys.modules:
        return sys.modules["tensorboardX"].SummaryWriter
    blocked = [name for name in _NOT_FOR_TENSORBOARD if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # `import name` raises ImportError.
    try:
        from tensorboardX import SummaryWriter
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return SummaryWriter


def open_board(workdir: Path, start_step: int):
    """A TensorBoard writer (tensorboardX: no TensorFlow) for event files in
    `workdir`. Events an earlier, interrupted run wrote at steps from
    `start_step` on are hidden: the resumed run writes those steps again."""
    SummaryWriter = import_summary_writer()
    return SummaryWriter(str(workdir), purge_step=start_step, flush_secs=30)
