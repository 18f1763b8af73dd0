"""The lecture's models (jaxgpt/lecture.py) and its ladder (python -m jaxgpt.tools.ladder)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import generate, lecture, model
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.tools import ladder

REPO = Path(__file__).resolve().parent.parent
V, T, C, H, L = 65, 8, 32, 4, 3


def config(name: str, **kw) -> ModelConfig:
    sizes = {"vocab_size": V, "block_size": T, "n_embd": C, "n_head": H, "n_layer": L}
    return ModelConfig(model=name, **{**sizes, **kw})


def init(cfg: ModelConfig, seed: int = 0):
    return jax.jit(lecture.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


def test_parameter_counts_are_the_lectures():
    """Closed forms: embeddings V*C + T*C, output layer C*V + V, and per step
    key/query/value 3C^2; ffwd C^2 + C; per block 3C^2 (heads) + C^2 + C (proj)
    + 8C^2 + 5C (ffwd 4x), and 4C for two LayerNorms; the final LayerNorm 2C."""
    outer = V * C + T * C + C * V + V
    block = 12 * C * C + 6 * C
    want = {
        "lecture_head": outer + 3 * C * C,
        "lecture_heads": outer + 3 * C * C,
        "lecture_ffwd": outer + 3 * C * C + C * C + C,
        "lecture_residual": outer + L * block,
        "lecture_layernorm": outer + L * (block + 4 * C) + 2 * C,
    }
    assert set(want) == set(lecture.STEPS)
    for name, count in want.items():
        shapes = jax.eval_shape(lambda n=name: init(config(n)))
        assert model.count_params(shapes) == count, name
    assert want["lecture_layernorm"] == 42_369  # The lecture's step 6 model.


def layer_norm(x):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def reference(p, idx, name: str) -> np.ndarray:
    """The lecture's forward pass in float64 numpy, written from its code."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    lin = lambda q, x: x @ q["kernel"] + q.get("bias", 0.0)

    def head(q, x):
        k, qq, v = lin(q["key"], x), lin(q["query"], x), lin(q["value"], x)
        wei = qq @ k.swapaxes(-1, -2) * k.shape[-1] ** -0.5
        wei = np.where(np.tril(np.ones((T, T))) > 0, wei, -np.inf)
        wei = np.exp(wei - wei.max(-1, keepdims=True))
        return (wei / wei.sum(-1, keepdims=True)) @ v

    def heads(q, x):
        return np.concatenate([head(q[f"heads_{i}"], x) for i in range(H)], -1)

    x = p["token_embedding_table"]["embedding"][idx]
    x = x + p["position_embedding_table"]["embedding"][:T]
    if name == "lecture_ffwd":
        x = np.maximum(lin(p["ffwd"]["net_0"], heads(p["sa_heads"], x)), 0)
    else:  # lecture_layernorm
        for i in range(L):
            b = p[f"blocks_{i}"]
            ln = lambda q, x: layer_norm(x) * q["scale"] + q["bias"]
            x = x + lin(b["sa"]["proj"], heads(b["sa"], ln(b["ln1"], x)))
            h = np.maximum(lin(b["ffwd"]["net_0"], ln(b["ln2"], x)), 0)
            x = x + lin(b["ffwd"]["net_2"], h)
        x = layer_norm(x) * p["ln_f"]["scale"] + p["ln_f"]["bias"]
    return lin(p["lm_head"], x)


@pytest.mark.parametrize("name", ["lecture_ffwd", "lecture_layernorm"])
def test_forward_matches_a_numpy_reference(name):
    cfg = config(name)
    params = init(cfg)
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, V)
    logits = jax.jit(lecture.make_model(cfg).apply)({"params": params}, idx)
    chex.assert_shape(logits, (2, T, V))
    np.testing.assert_allclose(logits, reference(params, idx, name), atol=2e-4)


@pytest.mark.parametrize("name", list(lecture.STEPS))
def test_causal(name):
    """Changing tokens after position t leaves the logits up to t unchanged."""
    cfg = config(name)
    params, apply = init(cfg), jax.jit(lecture.make_model(cfg).apply)
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, V)
    changed = idx.at[:, 5:].set((idx[:, 5:] + 3) % V)
    a, b = apply({"params": params}, idx), apply({"params": params}, changed)
    chex.assert_trees_all_close(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_sampling_re_runs_the_window_as_the_lectures_generate():
    """generate.sample on a lecture model (kv_cache on, as by default) gives the
    lecture's generate(): idx[:, -block_size:] through the model, its last
    logits; here greedy, past block_size tokens so that the window slides."""
    cfg = config("lecture_layernorm")
    params, apply = init(cfg), jax.jit(lecture.make_model(cfg).apply)
    prompt, N = [1, 2, 3], 2 * T
    options = {"max_new_tokens": N, "temperature": 0.0, "kv_cache": True}
    got = generate.sample(apply, params, cfg, prompt, jax.random.key(0), **options)
    idx = jnp.array([prompt])
    for _ in range(N):
        logits = apply({"params": params}, idx[:, -T:])[:, -1]
        idx = jnp.concatenate([idx, jnp.argmax(logits, -1)[:, None]], axis=1)
    np.testing.assert_array_equal(got, idx)
    with pytest.raises(ValueError, match="no KV cache"):
        lecture.make_model(cfg).apply({"params": params}, idx[:, :T], decode=True)


def test_pytorch_default_initialisation():
    """Embeddings N(0, 1); Linear weights and biases U(-1/sqrt(fan_in), +)."""
    params = init(config("lecture_layernorm", n_embd=64), seed=3)
    emb = np.asarray(params["token_embedding_table"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.05 and abs(emb.mean()) < 0.05
    fc = params["blocks_0"]["ffwd"]["net_2"]  # Linear(4C, C): fan_in 256.
    bound = 1 / np.sqrt(256)
    for w in (np.asarray(fc["kernel"]), np.asarray(fc["bias"])):
        assert np.abs(w).max() <= bound
    assert abs(np.asarray(fc["kernel"]).std() - bound / np.sqrt(3)) < 0.1 * bound
    ln = params["blocks_0"]["ln1"]
    np.testing.assert_array_equal(ln["scale"], 1.0)
    np.testing.assert_array_equal(ln["bias"], 0.0)


@pytest.mark.parametrize(
    "option", [{"scan_layers": True}, {"remat": True}, {"dtype": "bfloat16"}]
)
def test_gpt_only_options_are_refused_by_name(option):
    (name,) = option
    with pytest.raises(ConfigError, match=f"--{name}"):
        init(config("lecture_heads", **option))


def flags_of(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("--")]
    return dict(line[2:].partition("=")[::2] for line in lines)


def test_every_step_has_a_flagfile_for_its_model():
    models = {"bigram", *lecture.STEPS}
    for step in ladder.STEPS:
        for name in filter(None, (step.name, step.cpu_name)):
            flags = flags_of(REPO / "experiments" / "lecture" / f"{name}.cfg")
            assert flags["model"] in models, name
            assert flags["flagfile"] == "experiments/lecture/common.cfg", name
            assert flags["workdir"] == f"out/lecture/{name}", name
    scaled = flags_of(REPO / "experiments" / "lecture" / "7_scaled.cfg")
    want = {"n_layer": "6", "n_head": "6", "n_embd": "384", "block_size": "256"}
    assert {k: scaled[k] for k in want} == want and scaled["dropout"] == "0.2"


def test_the_ladder_trains_its_steps_and_writes_a_table_and_a_plot(
    tmp_path, corpus_path, corpus_text
):
    """Its steps run in the caller's folder (the dataset lands in ./data there)."""
    out = tmp_path / "ladder"
    quick = [
        "--max_iters=30",
        "--eval_interval=15",
        "--eval_iters=2",
        "--peak_tflops=1",
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgpt.tools.ladder",
            f"--out={out}",
            "--steps=2_head",
            "--",
            *quick,
            "--max_new_tokens=10",
            f"--data_path={corpus_path}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "read_only" not in done.stderr + done.stdout  # No orbax lines.
    records = [json.loads(x) for x in (out / "2_head" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 15, 30]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    table = (out / "ladder.md").read_text()
    (row,) = [line for line in table.splitlines() if "2_head.cfg" in line]
    cells = [c.strip() for c in row.strip("|").split("|")]
    v = len(set(corpus_text))  # The char tokenizer's vocabulary: 65 for shakespeare.
    assert cells[2] == f"{v * C + T * C + C * v + v + 3 * C * C:,}"  # Parameters.
    assert cells[3] == "30" and cells[5] == "2.37"
    assert cells[4] == f"{records[-1]['val_loss']:.3f}"
    assert (out / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "2_head.log").read_text().count("val loss") == 3
    meta = json.loads(
        (tmp_path / "data" / "shakespeare_char" / "meta.json").read_text()
    )
    assert meta["source"]["paths"] == [str(corpus_path)]


def test_ladder_lists_its_steps_from_a_non_editable_install(tmp_path, monkeypatch):
    """setup.cfg installs the flagfiles with the package: built as pip builds it
    (setuptools' build_py), `ladder --help` lists the steps and the flagfiles
    it found inside the installed package, and a step's includes resolve there,
    with no checkout beside it."""
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("jaxgpt", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("*.pyc"))
    build = [sys.executable, "-c", "import setuptools; setuptools.setup()"]
    subprocess.run([*build, "-q", "build_py", "-d", str(site)], cwd=src, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.tools.ladder", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    installed = site / "jaxgpt" / "experiments" / "lecture"
    assert f"in {installed})" in done.stdout
    for step in ladder.STEPS:
        assert f"  {step.name} " in done.stdout and step.what in done.stdout
        assert (installed / f"{step.name}.cfg").is_file()
    monkeypatch.setattr(ladder, "ROOT", site / "jaxgpt")
    monkeypatch.setattr(ladder, "FLAGFILES", installed)
    include, *flags = ladder.flags_of("7_scaled_cpu")
    assert include == f"--flagfile={installed / 'common.cfg'}"
    assert (installed / "common.cfg").is_file() and "--n_embd=128" in flags
