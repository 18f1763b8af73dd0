"""The scripts in benchmarks/ run, on a tiny model: their figures are only
meaningful on a quiet machine at full size, but a script that no longer runs
against the package is caught here. (data.py, a 4 GiB file, is left to be run
by hand: it is the size it measures; gpt2_step.py runs tiny in accelerator.py's
smoke run, tests/test_accelerators.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

# vs_torch.py and torch_twin.py compare with PyTorch (the test extra; a CPU build
# is all they need); the other scripts run without it.
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason='needs PyTorch (pip install -e ".[test]")',
)

MODEL = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=16",
    "--batch_size=4",
    "--eval_iters=2",
]
TINY = ["--flagfile=experiments/shakespeare_cpu.cfg", *MODEL]  # Its workdir is unused.
SHORT = ["--max_iters=12", "--lr_decay_iters=12", "--warmup_iters=2"]


@pytest.fixture
def data_flags(tmp_path, corpus_path) -> list[str]:
    return [f"--data_path={corpus_path}", f"--data_dir={tmp_path / 'data'}"]


def bench(script: str, *args: str, timeout: int = 240) -> str:
    """Runs benchmarks/<script> from the repository root; returns its output."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        check=False,  # The output goes into the failure message.
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def test_train_reports_step_time_and_mfu():
    out = bench("train.py", *TINY, "--bench_steps=3", "--bench_warmup=1")
    assert re.search(r"ms/step \(median\): [\d.]+", out)
    assert re.search(r"MFU: [\d.]+%", out)


@needs_torch
def test_vs_torch_step_compares_the_two_loops(data_flags):
    out = bench(
        "vs_torch.py", *TINY, *data_flags, "--bench_chunk=3", "--bench_rounds=1"
    )
    assert re.search(r"jaxgpt / torch tokens/s: [\d.]+x", out), out[-2000:]


@needs_torch
def test_vs_torch_run_times_both_commands(data_flags, tmp_path):
    modern = tmp_path / "modern.cfg"  # Another recipe: the modern one, as tiny.
    lines = ["--flagfile=experiments/shakespeare_cpu_modern.cfg", *MODEL, *SHORT]
    lines += data_flags  # Its own recipe: the data too (never the checkout's data/).
    modern.write_text("\n".join([*lines, "--eval_interval=6", "--max_new_tokens=8"]))
    out = bench(
        "vs_torch.py",
        *TINY,
        *SHORT,
        *data_flags,
        "--eval_interval=6",
        "--max_new_tokens=8",
        "--bench=run",
        "--bench_rounds=1",
        "--target_loss=10",
        f"--jaxgpt_flagfiles={modern}",
    )
    for name in ("jaxgpt", "jaxgpt modern", "torch twin"):
        # Each reached the (easy) target loss.
        assert re.search(rf"round 0: {name}: [\d.]+ s, .* at [\d.]+ s \(step 0\)", out)
    assert "median wall" in out
    assert "median time to val <= 10.0: jaxgpt modern" in out


@needs_torch
def test_vs_torch_sample_times_both_samplers(data_flags):
    out = bench(
        "vs_torch.py", *TINY, *data_flags, "--bench=sample", "--bench_rounds=1",
        "--bench_new_tokens=8",
    )  # fmt: skip
    assert re.search(r"\| torch generate\(\) \| [\d.]+ \|", out)


@needs_torch
def test_vs_torch_matmul_times_the_steps_products():
    out = bench(
        "vs_torch.py", *TINY, "--bench=matmul", "--bench_calls=3", "--bench_settle_s=0"
    )
    rows = re.findall(
        r"^\| (.+?) \| \[\d+, \d+\] @ \[\d+, \d+\] \| (\d) \|", out, re.MULTILINE
    )
    assert len(rows) == 15 and ("mlp c_proj weight grad", "1") in rows
    # Tiny products differ from their loop by less than the noise: a sign may flip.
    assert re.search(r"products per step: jaxgpt -?[\d.]+ ms, torch -?[\d.]+ ms", out)


@needs_torch
def test_vs_torch_seeds_evaluates_both_on_the_whole_split(data_flags):
    out = bench("vs_torch.py", *TINY, *SHORT, *data_flags, "--bench=seeds", "--seeds=1")
    assert re.search(
        r"^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.MULTILINE
    )


@needs_torch
def test_torch_twin_trains_and_samples(data_flags):
    out = bench(
        "torch_twin.py", *TINY, *SHORT, *data_flags, "--eval_interval=6",
        "--max_new_tokens=8",
    )  # fmt: skip
    losses = [float(v) for v in re.findall(r"val loss ([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert out.count("saving checkpoint to") == 1 + (losses[2] < losses[1])
    assert "sampled in" in out


def test_generate_and_compile():
    out = bench("generate.py", *MODEL, "--bench_batch_sizes=1", "--bench_new_tokens=8")
    assert re.search(
        r"^\| 1 \| yes \| [\d.]+ \| [\d.]+ \| [\d,]+ \|", out, re.MULTILINE
    )
    out = bench("compile.py", *MODEL, "--bench_layers=1", "--bench_batch=1")
    assert re.search(
        r"^\| 1 \| yes \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.MULTILINE
    )


def test_chat_eval_times_prompts_together_and_alone():
    out = bench(
        "chat_eval.py", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=64",
        "--bench_prompts=3", "--bench_new_tokens=4", "--bench_repeats=1",
    )  # fmt: skip
    for way, rows in (("together", 3), ("one at a time", 1)):
        row = rf"^\| {way} \| {rows} \| [\d.]+ \([\d.]+\) \| [\d.]+ \| [\d,]+ \| [\d.]+x \|$"
        assert re.search(row, out, re.MULTILINE), out[-2000:]
    assert re.search(
        r"^\| 3 prefills \(batched by padded length\) \| [\d.]+ \|",
        out,
        re.MULTILINE,
    )
    floor = r"^\| floor: the \d+ prompt tokens in one packed forward \| [\d.]+ \|"
    assert re.search(floor, out, re.MULTILINE), out[-2000:]


def test_tokenizer_trains_and_encodes(corpus_path):
    out = bench(
        "tokenizer.py", f"--text={corpus_path}", "--mb=0.2", "--vocab_size=300",
        "--small_vocab_size=280", "--encode_mb=0.05", "--skip_hf", "--num_workers=1",
    )  # fmt: skip
    assert "MB/s" in out


def test_ablation_runs_the_variants_and_tabulates_them(data_flags, tmp_path):
    results = tmp_path / "ablation.json"
    args = ["--seeds=1", f"--results={results}", f"--data_dir={tmp_path / 'data'}"]
    extra = [*MODEL, *SHORT, "--eval_interval=6", "--max_new_tokens=2", data_flags[0]]
    out = bench("ablation.py", "--variants=gpt2,modern", *args, *extra)
    row = r"^\| (gpt2|modern) \| .* \| [\d.]+ \| [\d.]+ \| not run \|"
    assert re.findall(row, out, re.MULTILINE) == ["gpt2", "modern"], out[-2000:]
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ablation  # --mode=time's schedule: the baseline's time at its own speed.

    done = json.loads(results.read_text())
    done["modern"]["steps"][0]["ms_per_step"] = (
        2 * done["gpt2"]["steps"][0]["ms_per_step"]
    )
    assert ablation.time_flags("modern", done) == [
        "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=6"
    ]  # fmt: skip


def test_evals_reports_examples_per_second():
    """The in-loop path (the harness's is tests/test_evals.py's)."""
    out = bench(
        "evals.py",
        "--bench_models=tiny_gpt2",
        "--bench_examples=2",
        "--bench_repeats=1",
        "--nobench_harness",
    )
    row = r"\| tiny_gpt2 \| [\d.]+M \| in the loop \| 2 \| \d+ \| [\d.]+ \| [\d.]+ \("
    assert re.search(row, out), out[-2000:]


def test_serve_times_the_server_and_the_engine(tmp_path):
    """Two streams of chat requests over HTTP to `python -m jaxgpt.serve`, and to
    the Engine in-process: every request gets its new tokens, every figure is there."""
    out = bench(
        "serve.py", "--bench_models=tiny", "--bench_streams=1,2",
        "--bench_parts=server,engine", "--bench_new_tokens=6",
        "--bench_prompt_tokens=8,12", "--bench_rounds=1", "--bench_slots=2",
        "--nobench_isolate", f"--bench_out={tmp_path / 'serve.json'}",
    )  # fmt: skip
    figures = r"[\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|"
    for part in ("server", "engine"):
        for streams in (1, 2):
            assert re.search(rf"^\| {streams} \| {part} \| {streams} \| {figures}$",
                             out, re.MULTILINE), out[-2000:]  # fmt: skip
    assert re.search(r"goal: server at 2 streams / its own single stream: [\d.]+x", out)
    done = json.loads((tmp_path / "serve.json").read_text())["tiny"]
    for part in ("server", "engine"):  # A char model has no stop token: all 6 each.
        assert {c: f["tokens"] for c, f in done[part].items()} == {"1": 6, "2": 12}
