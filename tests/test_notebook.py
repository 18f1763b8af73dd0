"""experiments/colab_tpu.ipynb, executed headless (nbclient) on a tiny model, twice:
it trains, plots, samples, and a second execution resumes where the first stopped.
Then once more on 8 fake CPU devices: the mesh, batch and dtype an accelerator
runtime gets, as far as a CPU can run them."""

import configparser
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import perf

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"
TINY = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=8",
    "--eval_interval=20",
    "--eval_iters=2",
    "--log_interval=10",
    "--warmup_iters=5",
    "--peak_tflops=1",  # For MFU: no peak measured first.
]


def execute(parameters: dict, cwd) -> nbformat.NotebookNode:
    """The notebook run with `parameters` set after its parameter cell (as
    papermill does), in a fresh kernel."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (at,) = [
        i
        for i, cell in enumerate(nb.cells)
        if "parameters" in cell.metadata.get("tags", [])
    ]
    given = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    nb.cells.insert(at + 1, new_code_cell(given))
    client = NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb


def text_of(cell) -> str:
    """Everything a cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/markdown", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def cell_with(nb, source: str):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and source in c.source]
    return cell


def val_losses(workdir) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines)}


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel and its children import jaxgpt from this checkout."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), path])))


RECORD_PIP = """\
import json, sys
from pathlib import Path
args = sys.argv[1:]
constraints = Path(args[args.index("-c") + 1]).read_text()
Path(sys.argv[0]).with_suffix(".json").write_text(json.dumps([args, constraints]))
"""


def test_notebook_trains_plots_samples_and_resumes(tmp_path, corpus_path, kernel_env):
    workdir = tmp_path / "run"
    pip = tmp_path / "pip.py"  # Records how the install cell calls pip.
    pip.write_text(RECORD_PIP)
    parameters = {
        "REPO": str(REPO),  # The local checkout: nothing is cloned.
        "INSTALL": True,
        "PIP": [sys.executable, str(pip)],  # This checkout's jaxgpt is importable.
        "CONFIG": "experiments/shakespeare_cpu.cfg",
        "MAX_ITERS": None,  # The flags' 40, not the notebook's own choice.
        "STOP_AT": 20,
        "USE_DRIVE": False,
        "WORKDIR": str(workdir),
        "SAMPLE_TOKENS": 40,
        # The dataset is prepared here, not in the checkout's data/.
        "EXTRA_FLAGS": [
            *TINY, "--max_iters=40", "--lr_decay_iters=40",
            f"--data_path={corpus_path}", f"--data_dir={tmp_path}",
        ],
    }  # fmt: skip
    first = execute(parameters, tmp_path)
    args, constraints = json.loads(pip.with_suffix(".json").read_text())
    assert args[:2] == ["install", "-q"] and args[-1] == str(REPO)
    # The runtime's JAX is kept: pip may not replace it (Colab's has TPU support).
    want = {f"{n}=={importlib.metadata.version(n)}" for n in ("jax", "jaxlib")}
    assert set(constraints.split()) == want

    losses = val_losses(workdir)
    assert sorted(losses) == [0, 20]  # Stopped at STOP_AT.
    assert losses[20] < losses[0] - 0.2
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    training = cell_with(first, "log = train(FLAGS)")
    assert any("image/png" in out.get("data", {}) for out in training.outputs)
    sample = text_of(cell_with(first, "--mode=sample"))
    assert sample.startswith("ROMEO:") and len(sample.strip()) > len("ROMEO:") + 20
    speed = text_of(cell_with(first, "statistics.median"))
    assert "ms/step" in speed and "tokens/s" in speed
    assert list(workdir.glob("events.out.tfevents.*"))  # TensorBoard is on.

    second = execute({**parameters, "STOP_AT": None, "INSTALL": False}, tmp_path)
    assert "resuming from step 20" in text_of(cell_with(second, "log = train(FLAGS)"))
    resumed = val_losses(workdir)
    assert sorted(resumed) == [0, 20, 40]
    assert resumed[0] == losses[0] and resumed[20] == losses[20]  # Not retrained.
    assert resumed[40] < resumed[20]


@pytest.mark.parametrize(
    "backend,kind,dtype",
    [
        ("tpu", "TPU v5 lite", "bfloat16"),
        ("tpu", "TPU v6 lite", "bfloat16"),
        ("gpu", "NVIDIA H100 80GB HBM3", "bfloat16"),
        ("gpu", "NVIDIA A100-SXM4-40GB", "bfloat16"),
        ("gpu", "Tesla T4", "float32"),  # Colab's free GPU: no bfloat16 units.
        ("gpu", "Tesla V100-SXM2-16GB", "float32"),
        ("cpu", "cpu", "float32"),
    ],
)
def test_notebook_computes_in_bfloat16_on_accelerators_that_have_it(
    backend, kind, dtype
):
    assert perf.compute_dtype(backend, kind) == dtype


def test_notebook_on_eight_devices_rounds_the_batch_and_trains_on_all(
    tmp_path, corpus_path, kernel_env, monkeypatch
):
    """The branch an 8-chip runtime (a TPU v5e-8) takes, on 8 fake CPU devices:
    the mesh from the device count, the batch rounded up to split over them,
    bfloat16 (given: on a CPU the notebook's own choice is float32)."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # The kernel's children see 8.
    workdir = tmp_path / "run"
    parameters = {
        "REPO": str(REPO),
        "INSTALL": False,
        "CONFIG": "experiments/shakespeare_cpu.cfg",
        "MAX_ITERS": 10,
        "USE_DRIVE": False,
        "WORKDIR": str(workdir),
        "DTYPE": "bfloat16",
        "SAMPLE_TOKENS": 20,
        "EXTRA_FLAGS": [
            *TINY,
            "--batch_size=12",  # Not a multiple of 8.
            "--eval_interval=10",
            "--notensorboard",
            f"--data_path={corpus_path}",
            f"--data_dir={tmp_path}",  # Never the checkout's data/.
        ],
    }
    nb = execute(parameters, tmp_path)

    devices = text_of(cell_with(nb, "MESH_FLAGS ="))
    assert "8 x cpu (cpu)" in devices
    assert "batch size rounded up to 16, a multiple of 8 devices" in devices
    assert "mesh: data=8 x fsdp=1; batch 16 = 2 rows per device; bfloat16" in devices
    meta = ckpt.read_meta(workdir)  # What the run trained.
    assert meta["model"]["dtype"] == "bfloat16" and meta["train"]["batch_size"] == 16
    losses = val_losses(workdir)
    assert sorted(losses) == [0, 10] and losses[10] < losses[0]
    assert text_of(cell_with(nb, "--mode=sample")).startswith("ROMEO:")
    speed = text_of(cell_with(nb, "statistics.median"))
    assert "| cpu | 8 x cpu | bfloat16 |" in speed


def test_the_repository_url_is_setup_cfgs():
    """setup.cfg's url is the one setting: the README's and the notebook's Colab
    badges open the notebook there, and the notebook clones it (a fork changes
    the url and these three copies, which this test lists)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    url = setup["metadata"]["url"]
    owner_repo = url.removeprefix("https://github.com/")
    badge = (
        f"https://colab.research.google.com/github/{owner_repo}/blob/main/"
        "experiments/colab_tpu.ipynb"
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert f"]({badge})" in (REPO / "README.md").read_text()
    assert f"]({badge})" in nb.cells[0].source
    (parameters,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert f'REPO = "{url}"' in parameters.source
