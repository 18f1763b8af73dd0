"""The mesh and the shardings: rules here, equivalence on 8 fake CPU devices.

The pytest process already runs JAX on one device, so the 8-device checks run
this file as a script in a subprocess (`python tests/test_sharding.py`), which
asks for 8 CPU devices before JAX starts and prints its measurements as JSON;
the tests below assert on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import subprocess_report
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxgpt import sharding, train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import layout, program

REPO = Path(__file__).resolve().parent.parent

# n_embd 36 divides by 4 but not by 8, vocab 65 by neither: some leaves stay
# replicated under --mesh_fsdp=8.
MODEL = ModelConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=36)
# The architecture options: q | k | v of 2 + 1 + 1 heads of 18 (72 columns),
# SwiGLU's gate | up, an untied lm_head, no position table or norm scales.
MODERN = dataclasses.replace(
    MODEL, position="rope", norm="rmsnorm", norm_scale=False, qk_norm=True,
    mlp="swiglu", n_kv_head=1, tie_embeddings=False, logit_cap=15.0,
)  # fmt: skip
TRAIN = TrainConfig(batch_size=16, warmup_iters=0)
STEPS, T = 3, MODEL.block_size
LEAVES = {  # Name in the report -> path in the parameters.
    "wte": ("wte", "embedding"),
    "c_attn": ("h_0", "attn", "c_attn", "kernel"),
    "c_fc": ("h_0", "mlp", "c_fc", "kernel"),
    "ln_1": ("h_0", "ln_1", "scale"),
}


# --- Rules, in this process (one device) -------------------------------------


@pytest.mark.parametrize(
    "shape,fsdp,spec",
    [
        ((65, 32), 4, P(None, "fsdp")),  # 65 does not divide: the next largest.
        ((32, 96), 4, P(None, "fsdp")),  # The largest dimension first.
        ((96, 32), 2, P("fsdp", None)),
        ((36, 108), 8, P()),  # Nothing divides by 8: replicated.
        ((128,), 8, P("fsdp")),
        ((), 4, P()),  # Scalars (the step, Adam's count) are replicated.
        ((96, 32), 1, P()),  # No FSDP: everything replicated.
    ],
)
def test_param_spec_splits_largest_divisible_dimension(shape, fsdp, spec):
    assert sharding.param_spec(shape, fsdp) == spec


@pytest.mark.parametrize(
    "batch,accum,mesh_shape,ok",
    [
        (16, 1, (8, 1), True),
        (16, 2, (2, 4), True),
        (12, 1, (8, 1), False),
        (16, 4, (2, 4), False),  # Micro-batches of 4 over 8 devices.
        (3, 1, (1, 1), True),
    ],
)
def test_check_batch_needs_micro_batches_that_split_over_devices(
    batch, accum, mesh_shape, ok
):
    mesh = AbstractMesh(mesh_shape, sharding.BATCH_AXES)
    if ok:
        layout.check_batch(batch, accum, mesh)
        return
    with pytest.raises(ConfigError) as e:
        layout.check_batch(batch, accum, mesh)
    message, n = str(e.value), mesh_shape[0] * mesh_shape[1]
    assert f"--batch_size={batch}" in message and f"the {n} devices" in message
    assert f"multiple of {n * accum}" in message
    assert (f"--grad_accum_steps={accum}" in message) == (accum > 1)


def test_default_mesh_is_all_devices_on_data():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}


@pytest.mark.parametrize("data,fsdp", [(2, 1), (None, 3), (1, 0)])
def test_mesh_that_does_not_match_the_devices_is_refused(data, fsdp):
    with pytest.raises(ConfigError, match="--mesh_data=.* --mesh_fsdp="):
        sharding.make_mesh(data, fsdp)


def test_abstract_state_carries_the_shardings():
    mesh = sharding.make_mesh()
    abstract = program.abstract_state(MODEL, TRAIN, mesh)
    real = program.create_state(MODEL, TRAIN, train.root_key(0), mesh)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding == r.sharding == layout.replicated(mesh)


def test_layout_hints_leave_values_alone_without_a_mesh():
    """On one device (the core's step, no mesh) split_batch, gather and
    shard_like_params return what they are given."""
    tree = {"w": np.ones((4, 2), np.float32)}
    for hint in (sharding.split_batch, sharding.gather, sharding.shard_like_params):
        assert hint(tree) is tree


# --- On 8 fake CPU devices, in a subprocess ----------------------------------


def max_diff(a, b) -> float:
    a, b = jax.device_get((a, b))  # Whole arrays, whichever devices held them.
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def run_steps(model_cfg, train_cfg, tokens, mesh=None):
    """STEPS steps of the loop's program (its step and batches) laid out on
    `mesh`; without one, the core's own (train.py's, on one device)."""
    root, B = train.root_key(0), train_cfg.batch_size
    if mesh is None:
        state = train.create_state(model_cfg, train_cfg, root)
        step = train.make_train_step(model_cfg, train_cfg)
        batches = train.make_batches(tokens, root, B, T)
    else:
        state = program.create_state(model_cfg, train_cfg, root, mesh)
        step = program.make_train_step(model_cfg, train_cfg, mesh)
        batches = program.make_batches(tokens, root, B, T, mesh)
    losses = []
    for s in range(STEPS):
        x_BT, y_BT = batches(s)
        state, metrics = step(state, x_BT, y_BT, root)
        losses.append(float(metrics["loss"]))
    return state, losses, x_BT


def leaf_layouts(state) -> dict:
    """Spec and per-device shard shape of a few leaves."""
    out = {}
    for name, path in LEAVES.items():
        x = state.params
        for key in path:
            x = x[key]
        out[name] = [str(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["h_0"]["attn"]["c_attn"]
    mu = mu["kernel"]
    out["adam_mu_c_attn"] = [str(mu.sharding.spec)]
    out["step"] = [str(state.step.sharding.spec)]
    return out


def eight_device_report() -> dict:
    """Runs in the subprocess: measurements of the sharded path against one device."""
    assert jax.device_count() == 8, jax.devices()
    tokens = np.random.default_rng(1).integers(0, 65, 4096).astype(np.int32)
    report = {}
    ref_state, ref_losses, _ = run_steps(MODEL, TRAIN, tokens)
    cases = {  # name: (data, fsdp, grad_accum_steps)
        "8x1": (8, 1, 1),
        "2x4": (2, 4, 1),
        "1x8_accum2": (1, 8, 2),  # Against one step on the whole batch.
    }
    for name, (data, fsdp, accum) in cases.items():
        train_cfg = dataclasses.replace(TRAIN, grad_accum_steps=accum)
        mesh = sharding.make_mesh(data, fsdp)
        state, losses, x_BT = run_steps(MODEL, train_cfg, tokens, mesh)
        report[name] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "param_diff": max_diff(state.params, ref_state.params),
            "opt_state_diff": max_diff(state.opt_state, ref_state.opt_state),
            "layout": leaf_layouts(state),
            "batch_spec": str(x_BT.sharding.spec),
            "batch_rows_per_device": x_BT.addressable_shards[0].data.shape[0],
        }
        if name == "2x4":
            report["restore"] = restore_report(MODEL, state)
    ref_state, ref_losses, _ = run_steps(MODERN, TRAIN, tokens)
    state, losses, _ = run_steps(MODERN, TRAIN, tokens, sharding.make_mesh(2, 4))
    report["modern_2x4"] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "param_diff": max_diff(state.params, ref_state.params),
        "opt_state_diff": max_diff(state.opt_state, ref_state.opt_state),
        "c_attn": str(state.params["h_0"]["attn"]["c_attn"]["kernel"].sharding.spec),
        "lm_head": str(state.params["lm_head"]["kernel"].sharding.spec),
    }
    report["errors"] = error_report(tokens)
    return report


def restore_report(model_cfg, state) -> dict:
    """Saves a 2x4 state; restores it onto other meshes through abstract targets."""
    out = {}
    with tempfile.TemporaryDirectory() as workdir:
        checkpointer = ckpt.Checkpointer(workdir, {})
        checkpointer.save(STEPS, state)
        checkpointer.wait()
        for data, fsdp in [(4, 2), (8, 1)]:
            mesh = sharding.make_mesh(data, fsdp)
            target = program.abstract_state(model_cfg, TRAIN, mesh)
            restored = checkpointer.restore(target)
            out[f"{data}x{fsdp}"] = {
                "shardings_match": all(
                    r.sharding == t.sharding
                    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))
                ),
                "c_attn_spec": leaf_layouts(restored)["c_attn"][0],
                "exact": max_diff(restored.params, state.params) == 0.0
                and max_diff(restored.opt_state, state.opt_state) == 0.0,
            }
        checkpointer.close()
    return out


def error_report(tokens) -> dict:
    """The messages of a batch that does not split over the 8 devices."""
    out = {}
    mesh = sharding.make_mesh()
    for name, (batch, accum) in {"batch12": (12, 1), "accum4": (16, 4)}.items():
        try:
            layout.check_batch(batch, accum, mesh)
            out[name] = "no error"
        except ConfigError as e:
            out[name] = str(e)
    try:
        sharding.make_mesh(3, 2)
        out["mesh"] = "no error"
    except ConfigError as e:
        out["mesh"] = str(e)
    return out


@pytest.fixture(scope="module")
def report():
    return subprocess_report(__file__, timeout=400)


@pytest.mark.parametrize("case", ["8x1", "2x4", "1x8_accum2"])
def test_sharded_steps_match_one_device(report, case):
    r = report[case]
    assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-5, r
    assert r["opt_state_diff"] < 1e-5, r
    assert r["batch_spec"] == str(P(("data", "fsdp")))
    assert r["batch_rows_per_device"] == 16 // 8


def test_the_architecture_options_shard_like_gpt2(report):
    """FSDP over 4 on the modern model (fused q|k|v of GQA, untied lm_head):
    the same steps as on one device, its new kernels split too."""
    r = report["modern_2x4"]
    assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-5, r
    assert r["opt_state_diff"] < 1e-5, r
    assert r["c_attn"] == str(P(None, "fsdp")) and r["lm_head"] == str(P("fsdp", None))


@pytest.mark.parametrize(
    "case,expected",
    [
        (  # Data parallel: every leaf whole on every device.
            "8x1",
            {
                "wte": [str(P()), [65, 36]],
                "c_attn": [str(P()), [36, 108]],
                "ln_1": [str(P()), [36]],
            },
        ),
        (  # FSDP over 4: the largest dimension that divides by 4.
            "2x4",
            {
                "wte": [str(P(None, "fsdp")), [65, 9]],
                "c_attn": [str(P(None, "fsdp")), [36, 27]],
                "c_fc": [str(P(None, "fsdp")), [36, 36]],
                "ln_1": [str(P("fsdp")), [9]],
                "adam_mu_c_attn": [str(P(None, "fsdp"))],
            },
        ),
        (  # FSDP over 8: 65, 36 and 108 do not divide, 144 does.
            "1x8_accum2",
            {
                "wte": [str(P()), [65, 36]],
                "c_attn": [str(P()), [36, 108]],
                "c_fc": [str(P(None, "fsdp")), [36, 18]],
                "ln_1": [str(P()), [36]],
                "adam_mu_c_attn": [str(P())],
            },
        ),
    ],
)
def test_parameter_shardings_follow_the_mesh_flags(report, case, expected):
    got = report[case]["layout"]
    for name, value in expected.items():
        assert got[name] == value, (name, got[name])
    assert got["step"] == [str(P())]


def test_restore_puts_arrays_back_with_the_target_shardings(report):
    for mesh, spec in [("4x2", P(None, "fsdp")), ("8x1", P())]:
        r = report["restore"][mesh]
        assert r["shardings_match"] and r["exact"], r
        assert r["c_attn_spec"] == str(spec)


def test_batch_that_does_not_split_over_the_devices_is_one_clear_error(report):
    errors = report["errors"]
    assert errors["batch12"].startswith("--batch_size=12 does not split over the 8")
    assert "--mesh_data=8 x --mesh_fsdp=1" in errors["batch12"]
    assert "--grad_accum_steps=4" in errors["accum4"]
    assert "must equal the number of devices, 8" in errors["mesh"]


def test_cli_batch_that_does_not_split_is_one_line_without_traceback(corpus_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgpt.main",
            f"--data_path={corpus_path}",
            "--data_dir=/nonexistent/never/written",
            "--batch_size=6",
            "--mesh_fsdp=2",
        ],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: --batch_size=6 does not split over the 4 devices")
    assert "--mesh_data=2 x --mesh_fsdp=2" in line


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    print(json.dumps(eight_device_report()))
