"""GPT-2 weights through the command line: --init_from to sample, evaluate and
finetune, and `python -m jaxgpt.hub.export` back to transformers.

The GPT-2 is a small random GPT2LMHeadModel made here (GPT-2's vocabulary and
tokenizer, 2 layers, width 64, context 64): nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxgpt import lecture, main, sharding, train
from jaxgpt.datasets import prepare
from jaxgpt.hub import hf, load, tokenizer_io
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run.configs import DataConfig, RunConfig

# The reference is transformers on PyTorch (the test extra; a CPU build is all
# it needs): without them these tests skip, and the rest of the suite runs.
torch = pytest.importorskip("torch", reason='needs PyTorch (pip install -e ".[test]")')
transformers = pytest.importorskip(
    "transformers", reason='needs transformers (pip install -e ".[test]")'
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A random small GPT-2 saved by transformers, with GPT-2's tokenizer files."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn(p.shape))  # Non-trivial biases and gains.
    folder = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(folder)
    files, _ = hf.tokenizer_files(tokenizer_io.load_gpt2())
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def data_flags(tmp_path_factory, corpus_path) -> dict:
    data_dir = tmp_path_factory.mktemp("data")
    return {
        "data_dir": str(data_dir),
        "dataset": "shakespeare",
        "data_path": str(corpus_path),
    }


@pytest.fixture
def parsed_flags():
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def export(*args: str) -> subprocess.CompletedProcess:
    """`python -m jaxgpt.hub.export` with `args`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "jaxgpt.hub.export", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def run_main(capsys, **settings) -> str:
    with flagsaver.flagsaver(**settings):
        assert main.main(["jaxgpt.main"]) == 0
    return capsys.readouterr().out


def test_sample_from_imported_weights_is_transformers_greedy(
    gpt2_folder, capsys, parsed_flags
):
    out = run_main(
        capsys, mode="sample", init_from=str(gpt2_folder), prompt="Hello, my",
        temperature=0.0, max_new_tokens=12,
    )  # fmt: skip
    gpt2 = tokenizer_io.load_gpt2()
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    prompt = torch.as_tensor(gpt2.encode("Hello, my")[None], dtype=torch.long)
    want = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.split("\n" + "-" * 40)[0] == gpt2.decode(want[0].numpy())


def test_eval_of_imported_weights_is_transformers_loss(
    gpt2_folder, data_flags, capsys, parsed_flags
):
    out = run_main(
        capsys, mode="eval", init_from=str(gpt2_folder), eval_iters=2, batch_size=4,
        seed=3, **data_flags,
    )  # fmt: skip
    losses = dict(line.split(": loss ") for line in out.strip().splitlines())
    val_loss, val_bpb = (
        float(v.split()[0].rstrip(",")) for v in losses["val"].split(", ")
    )
    # The same windows through transformers: eval_batches draws them from the seed.
    dataset = prepare.read_dataset(DataConfig(**data_flags))
    x, y = train.eval_batches(dataset.splits["val"], train.root_key(3), 2, 4, 64)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(np.array(x).reshape(8, 64))).logits
        want = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 50257), torch.as_tensor(np.array(y).reshape(-1)).long()
        )
    assert abs(val_loss - float(want)) < 1e-4
    n_bytes = tokenizer_io.token_bytes(dataset.tokenizer)[np.asarray(y)].sum()
    assert abs(val_bpb - float(want) * y.size / (n_bytes * np.log(2))) < 1e-4


def test_finetune_resume_and_export_to_transformers(
    gpt2_folder, data_flags, tmp_path, capsys, parsed_flags
):
    workdir = tmp_path / "ft"
    settings = dict(
        init_from=str(gpt2_folder), workdir=str(workdir), batch_size=4,
        learning_rate=1e-4, min_lr=1e-4, warmup_iters=0, max_iters=6, stop_at=3,
        eval_interval=3, eval_iters=2, log_interval=1, max_new_tokens=4, **data_flags,
    )  # fmt: skip
    run_main(capsys, **settings)
    meta = ckpt.read_meta(workdir)
    assert meta["init_from"] == str(gpt2_folder)
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["model"]["bias"] is True
    first = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    # Step 0 evaluates the imported weights themselves.
    imported = run_main(
        capsys, mode="eval", init_from=str(gpt2_folder), eval_iters=2, batch_size=4,
        **data_flags,
    )  # fmt: skip
    assert f"val: loss {first[0]['val_loss']:.4f}" in imported
    # Resuming needs the workdir only: the finetune's own architecture and weights.
    moved = tmp_path / "moved"
    os.rename(gpt2_folder, moved)
    try:
        run_main(capsys, **{**settings, "stop_at": None})
    finally:
        os.rename(moved, gpt2_folder)
    assert ckpt.read_meta(workdir)["init_from"] == str(gpt2_folder)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert steps == [0, 3, 6]

    # Export: transformers loads the folder and computes the same logits.
    out = tmp_path / "exported"
    done = export(f"--workdir={workdir}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vocab.json and merges.txt" in done.stdout
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model_cfg, params, _ = load.load_model(
        RunConfig(workdir=str(workdir)), "latest", sharding.make_mesh()
    )
    ids = np.random.default_rng(0).integers(0, 50257, (2, 64))
    with torch.no_grad():
        want = hf_model(torch.as_tensor(ids)).logits.numpy()
    got = lecture.make_model(model_cfg).apply({"params": params}, ids)
    assert np.abs(np.asarray(got) - want).max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not to be: that is the question."
    assert hf_tok(text)["input_ids"] == tokenizer_io.load_gpt2().encode(text).tolist()


def test_a_char_run_exports_its_tokenizer_and_imports_back(
    tmp_path, corpus_path, capsys, parsed_flags
):
    workdir = tmp_path / "char"
    run_main(
        capsys, workdir=str(workdir), data_dir=str(tmp_path / "data"),
        data_path=str(corpus_path), n_layer=1, n_head=2, n_embd=16, block_size=16,
        batch_size=4, max_iters=2, warmup_iters=0, eval_iters=1, max_new_tokens=2,
    )  # fmt: skip
    out = tmp_path / "exported"
    done = export(f"--workdir={workdir}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "jaxgpt_tokenizer.json" in done.stdout and "char" in done.stdout
    # The weights are as readable as the folder's other files (not 0600), and
    # reading the checkpoint logged nothing of orbax's.
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    assert "read_only" not in done.stderr and "MetadataStore" not in done.stderr
    assert transformers.GPT2LMHeadModel.from_pretrained(out).config.n_layer == 1
    sample = run_main(
        capsys, mode="sample", init_from=str(out), prompt="ROMEO:", max_new_tokens=5,
        temperature=0.0,
    )  # fmt: skip
    assert sample.startswith("ROMEO:")


def test_init_from_errors_are_one_line(tmp_path, capsys, parsed_flags):
    missing = str(tmp_path / "missing")
    with (
        flagsaver.flagsaver(mode="sample", init_from=missing),
        pytest.raises(SystemExit) as e,
    ):
        main.main(["jaxgpt.main"])
    message = str(e.value.code)
    assert message.startswith("error: --init_from=") and "\n" not in message
    no_out = export(f"--workdir={tmp_path}")
    assert no_out.returncode == 1 and "error: --out" in no_out.stderr
    assert "Traceback" not in no_out.stderr
