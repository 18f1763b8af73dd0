"""Looking at a run: loss plots (python -m jaxgpt.tools.plot) and TensorBoard event files,
from a real short run of python -m jaxgpt.main."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure
from tensorboardX.proto import event_pb2

from jaxgpt import train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import metrics
from jaxgpt.run.configs import LoopConfig, RunConfig
from jaxgpt.tools import plot

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=8",
    "--max_iters=40",
    "--eval_interval=20",
    "--eval_iters=2",
    "--log_interval=10",
    "--warmup_iters=5",
    "--max_new_tokens=30",
    "--peak_tflops=1",  # For MFU: no peak measured first.
]


HELLASWAG = [  # Rows in Rowan/hellaswag's schema, for --eval_tasks=hellaswag.
    {
        "activity_label": "Cooking",
        "ctx_a": f"A man boils {w}.",
        "ctx_b": "he",
        "endings": [f"eats the {w}.", "sleeps.", "sings a song.", "leaves."],
        "label": str(i % 4),
    }
    for i, w in enumerate(["eggs", "rice", "tea", "soup", "beans"])
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_path) -> Path:
    """The workdir of a 40-step run (evaluations at 0, 20, 40), TensorBoard on,
    HellaSwag scored at each evaluation; its log beside it in log.txt."""
    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    rows = workdir.parent / "hellaswag.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.main", *TINY]
        + [f"--data_path={corpus_path}", f"--data_dir={workdir.parent / 'data'}"]
        + [f"--workdir={workdir}"]
        + ["--eval_tasks=hellaswag", f"--eval_data_path={rows}"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (workdir.parent / "log.txt").write_text(done.stderr)
    return workdir


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def test_plot_writes_an_image_of_the_runs(run, tmp_path, capsys):
    out = tmp_path / "plots" / "loss.png"
    assert plot.main([str(run), str(run), f"--out={out}", "--title=tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    image = matplotlib.image.imread(out)
    assert image.shape == (600, 1680, 4)  # 14 x 5 inches at 120 dpi: two panels.
    assert image[..., :3].std() > 0.05  # Not a blank canvas.


def test_task_accuracies_are_logged_and_drawn(run):
    """--eval_tasks=hellaswag: each evaluation's record, log line and panel."""
    want = records(run)
    assert all(0 <= r["hellaswag_acc_norm"] <= 1 for r in want)
    assert all(r["hellaswag_acc"] * 5 == round(r["hellaswag_acc"] * 5) for r in want)
    log = (run.parent / "log.txt").read_text()
    line = f"hellaswag acc {want[-1]['hellaswag_acc']:.4f}, hellaswag acc_norm"
    assert "step 40: train loss" in log and line in log
    ax = plot.draw_tasks(Figure().subplots(), [run], ["tiny"])
    acc_norm, acc = ax.lines
    np.testing.assert_array_equal(acc_norm.get_xdata(), [0, 20, 40])
    np.testing.assert_array_equal(
        acc_norm.get_ydata(), [r["hellaswag_acc_norm"] for r in want]
    )
    np.testing.assert_array_equal(acc.get_ydata(), [r["hellaswag_acc"] for r in want])
    assert acc.get_linestyle() == ":" and plot.task_metrics([run]) == ["hellaswag"]


def test_curves_are_the_runs_metrics_labelled_from_its_config(run):
    ax = plot.draw(Figure().subplots(), [run])
    want = records(run)
    val, train_ = ax.lines
    np.testing.assert_array_equal(val.get_xdata(), [0, 20, 40])
    np.testing.assert_array_equal(val.get_ydata(), [r["val_loss"] for r in want])
    np.testing.assert_array_equal(train_.get_ydata(), [r["train_loss"] for r in want])
    assert train_.get_linestyle() == "--" and val.get_color() == train_.get_color()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["tiny: gpt 1L 2H 32C 32T"]


def test_by_default_the_image_goes_beside_the_first_run(
    run, tmp_path, monkeypatch, capsys, caplog
):
    """Not into the current folder; and reading the labels' checkpoints logs
    nothing of orbax's."""
    monkeypatch.chdir(tmp_path)
    for extra, name in (([], "loss.png"), (["--bpb"], "bpb.png")):
        (run / name).unlink(missing_ok=True)
        assert plot.main([str(run), *extra]) == 0
        assert capsys.readouterr().out.strip() == str(run / name)
        # Two panels (the run scored HellaSwag): 14 x 5 inches at 120 dpi.
        assert matplotlib.image.imread(run / name).shape == (600, 1680, 4)
    assert list(tmp_path.iterdir()) == []
    assert not [r for r in caplog.records if "/orbax/" in r.pathname]


def test_bpb_curves_are_the_runs_bits_per_byte(run):
    """Bits per byte: what compares a character-level run with a BPE one."""
    ax = plot.draw(Figure().subplots(), [run], metric="bpb")
    want = records(run)
    val, train_ = ax.lines
    np.testing.assert_array_equal(val.get_ydata(), [r["val_bpb"] for r in want])
    np.testing.assert_array_equal(train_.get_ydata(), [r["train_bpb"] for r in want])
    assert "bits per byte" in ax.get_ylabel()


def test_a_step_evaluated_twice_keeps_its_last_record(tmp_path):
    lines = [
        {"step": 0, "train_loss": 4.0, "val_loss": 4.1},
        {"step": 20, "train_loss": 3.0, "val_loss": 3.5},
        {"step": 20, "train_loss": 2.9, "val_loss": 3.4},  # A resumed run's.
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines)
    )
    assert [r["val_loss"] for r in plot.read_metrics(tmp_path)] == [4.1, 3.4]
    assert plot.label(tmp_path) == tmp_path.name  # No checkpoint: its name alone.


def test_a_folder_without_metrics_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        plot.main([str(tmp_path / "nothing"), f"--out={tmp_path / 'x.png'}"])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "metrics.jsonl" in message
    assert "\n" not in message


def events(workdir: Path):
    """Every event in the workdir's TensorBoard files (TFRecord: a length, its
    CRC, the serialized Event, its CRC)."""
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            yield event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4


def scalars_and_texts(workdir: Path):
    scalars, texts = {}, {}
    for event in events(workdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
            else:
                texts[event.step] = value.tensor.string_val[0].decode()
    return scalars, texts


def test_tensorboard_holds_the_runs_figures_and_samples(run):
    assert RunConfig().tensorboard  # On by default.
    scalars, texts = scalars_and_texts(run)
    want = records(run)
    for name in ("val_loss", "train_loss", "hellaswag_acc", "hellaswag_acc_norm"):
        got = scalars[f"eval/{name}"]
        assert got == {r["step"]: pytest.approx(r[name], rel=1e-6) for r in want}
    logged = [10, 20, 30, 40]
    for tag in ("train/loss", "train/grad_norm", "perf/tokens_per_s", "perf/mfu"):
        assert sorted(scalars[tag]) == logged, tag
        assert all(v > 0 for v in scalars[tag].values()), tag
    schedule = train.lr_schedule(TrainConfig(max_iters=40, warmup_iters=5))
    for step, lr in scalars["train/lr"].items():
        assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-6)
    assert sorted(texts) == [0, 20, 40]  # A sample at each evaluation.
    assert all(t.startswith("```\n") and len(t) > 30 for t in texts.values())


def test_tensorboard_switched_off_writes_no_events(tmp_path):
    model_cfg = ModelConfig(vocab_size=65, n_layer=1, n_head=2, n_embd=32)
    train_cfg = TrainConfig(max_iters=10, warmup_iters=2)
    schedule = train.lr_schedule(train_cfg)
    for on, folder in ((False, tmp_path / "off"), (True, tmp_path / "on")):
        folder.mkdir()
        loop_cfg = LoopConfig(max_iters=10)
        log = metrics.TrainLog(
            folder, model_cfg, train_cfg, loop_cfg, schedule, 0, None, 1, on
        )
        log.evaluation(0, {"train_loss": 4.0, "val_loss": 4.1, "val_bpb": 5.9})
        log.close(0, None)
    assert not list((tmp_path / "off").glob("events.*"))
    scalars, _ = scalars_and_texts(tmp_path / "on")
    assert scalars["eval/val_bpb"] == {0: pytest.approx(5.9)}  # Bits per byte too.


def test_tensorboard_writer_leaves_torch_unimported_and_importable(tmp_path):
    """tensorboardX would import torch (a second of start-up) when installed;
    the writer is opened without it, and torch still imports afterwards."""
    code = (
        "import importlib.util, sys\n"
        "from jaxgpt.run import metrics\n"
        f"writer = metrics.open_board({str(tmp_path)!r}, 0)\n"
        "writer.add_scalar('loss', 1.5, 1); writer.close()\n"
        "assert 'torch' not in sys.modules and 'boto3' not in sys.modules\n"
        "if importlib.util.find_spec('torch'):\n"
        "    import torch\n"
        "    assert torch.ones(2).sum().item() == 2\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert list(tmp_path.glob("events.out.tfevents.*"))
