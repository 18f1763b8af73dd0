"""What a run prints while it trains: the first step's time apart, steps of the
total and the time left (metrics.TrainLog), and every log line as
`HH:MM:SS message` (run/quiet.py)."""

from __future__ import annotations

import logging
import re
import types

from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import metrics, quiet
from jaxgpt.run.configs import LoopConfig


def test_first_step_apart_then_steps_of_the_total_and_time_left(
    tmp_path, monkeypatch, capsys
):
    clock = [100.0]
    monkeypatch.setattr(
        metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0])
    )
    model_cfg = ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=16, block_size=8)
    train_cfg = TrainConfig(batch_size=4, max_iters=100, warmup_iters=1)
    loop_cfg = LoopConfig(max_iters=100, log_interval=10)
    log = metrics.TrainLog(tmp_path, model_cfg, train_cfg, loop_cfg, lambda s: 1e-3, 0)
    clock[0] += 5.0  # Step 1: its compilation.
    log.step(1, {"loss": 2.5})
    for step in range(2, 11):  # 0.125 s each (exact in binary).
        clock[0] += 0.125
        log.step(step, {"loss": 2.0})
    log.close(10, None)
    lines = capsys.readouterr().err.splitlines()
    first, tenth = [line for line in lines if re.match(r"\d\d:\d\d:\d\d step", line)]
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d step 1: loss 2.5000, first step 5.0 s \(compile included;"
        r" ms/step leaves it out\); 1/100 steps \(1%\)",
        first,
    )
    # 125 ms/step, 32 tokens in 0.125 s; 90 steps to go at 0.125 s: 11.25 s.
    assert ", 125.0 ms/step, 256 tok/s" in tenth
    assert tenth.endswith("; 10/100 steps (10%), 00:11 left")


def test_log_lines_are_the_time_and_the_message_warnings_marked():
    def line(level: int, message: str, *args) -> str:
        record = logging.LogRecord("absl", level, "main.py", 1, message, args, None)
        return quiet.LINES.format(record)

    assert re.fullmatch(
        r"\d\d:\d\d:\d\d saved step 5", line(logging.INFO, "saved step %d", 5)
    )
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d WARNING disk almost full",
        line(logging.WARNING, "disk almost full"),
    )
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR failed", line(logging.ERROR, "failed"))
    assert quiet.stamp("hi", when=0.0).endswith(" hi")
