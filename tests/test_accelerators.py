"""Every program a TPU or GPU user runs, lowered for TPU and CUDA on this CPU;
and benchmarks/accelerator.py, the GPU's measurements, run at --smoke size.

jax.export lowers a jitted function for platforms this machine lacks: every
platform-specific lowering rule runs, and the module keeps the shardings
the mesh gives its inputs, outputs and intermediate values (Shardy's
`sdy.sharding` attributes; XLA partitions them when it compiles for the
device). The pytest process runs JAX on one device, so the lowerings run in
one subprocess with 8 fake CPU devices (`python tests/test_accelerators.py`),
which prints what each lowered module holds as JSON; the tests below assert
on it. cuDNN's attention cannot be lowered without a GPU's cuDNN: off a GPU
`--attention=cudnn` is refused in one line (tests/test_main.py, and the
script's cudnn row below).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, subprocess_report
from jax.sharding import Mesh

from jaxgpt import generate, lecture, sharding
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.run import layout, program

PLATFORMS = ("tpu", "cuda")
# bfloat16 and XLA's attention, as on a TPU or GPU; no dropout (dot_product has none).
MODEL = ModelConfig(
    vocab_size=64,
    block_size=16,
    n_layer=2,
    n_head=2,
    n_embd=32,
    dropout=0.0,
    dtype="bfloat16",
    attention="dot_product",
)
TRAIN = TrainConfig(batch_size=16, warmup_iters=0)
# The modern GPT's options (nanochat's set; one key/value head: multi-query).
MODERN = {
    "position": "rope", "norm": "rmsnorm", "norm_scale": False, "qk_norm": True,
    "mlp": "relu2", "n_kv_head": 1, "tie_embeddings": False, "logit_cap": 15.0,
}  # fmt: skip
# name: (ModelConfig changes, TrainConfig changes, mesh: "2x4" or "1").
TRAIN_CASES = {
    "adamw_2x4": ({}, {}, "2x4"),
    "adamw_1": ({}, {}, "1"),
    "float32_2x4": ({"dtype": "float32"}, {}, "2x4"),  # The bfloat16 count's control.
    "remat_2x4": ({"remat": True}, {}, "2x4"),
    "scan_2x4": ({"scan_layers": True}, {}, "2x4"),
    "remat_scan_2x4": ({"remat": True, "scan_layers": True}, {}, "2x4"),
    "muon_2x4": ({}, {"optimizer": "muon"}, "2x4"),
    "muon_scan_2x4": ({"scan_layers": True}, {"optimizer": "muon"}, "2x4"),
    "muon_1": ({}, {"optimizer": "muon"}, "1"),
    "einsum_dropout_2x4": ({"attention": "einsum", "dropout": 0.1}, {}, "2x4"),
    "accum_2x4": ({}, {"grad_accum_steps": 2}, "2x4"),
    # The modern GPT, then with remat, scan and Muon; SwiGLU on one device.
    "modern_2x4": (MODERN, {}, "2x4"),
    "modern_remat_scan_muon_2x4": (
        {**MODERN, "remat": True, "scan_layers": True}, {"optimizer": "muon"}, "2x4"
    ),
    "swiglu_1": ({"mlp": "swiglu", "tie_embeddings": False}, {}, "1"),
}  # fmt: skip
EVAL_CASES = {
    "eval_2x4": ("2x4", {}),
    "eval_1": ("1", {}),
    "eval_modern_2x4": ("2x4", MODERN),
}
# name: (kv_cache, ModelConfig changes); the rotary model's cache rolls on.
SAMPLE_CASES = {
    "sample_kv_cache": (True, {}),
    "sample_window": (False, {}),
    "sample_modern_rolling": (True, MODERN),
}
CASES = [*TRAIN_CASES, *EVAL_CASES, *SAMPLE_CASES]
BFLOAT16_CASES = [c for c in CASES if c != "float32_2x4"]


# --- In the subprocess: lower every program, report what the modules hold ------


def make_mesh(name: str) -> Mesh:
    if name == "1":  # One device, as a single-chip runtime has.
        return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.BATCH_AXES)
    data, fsdp = map(int, name.split("x"))
    return sharding.make_mesh(data, fsdp)


def spec(shape, dtype, sharding_=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def train_args(model_cfg, train_cfg, mesh):
    """The train step's arguments as shapes: state, x_BT, y_BT, the root key."""
    x_BT = spec(
        (train_cfg.batch_size, model_cfg.block_size),
        jnp.int32,
        layout.batch_sharding(mesh),
    )
    root = spec((2,), jnp.uint32, layout.replicated(mesh))
    return program.abstract_state(model_cfg, train_cfg, mesh), x_BT, x_BT, root


# An argument of the module's main function: its sharding on the mesh, its name.
ARG = re.compile(
    r"%arg\d+: tensor<[^>]*> \{(?:[^{}]|\{[^{}]*\})*?"
    r"sdy\.sharding = #sdy\.sharding<@mesh, (\[[^>]*\])>[^)]*?\} loc\(\"([^\"]*)\"\)"
)


def describe(exported: jax.export.Exported) -> dict:
    """What a lowered module holds: its platforms and devices, its matmuls,
    loops, recomputation barriers, and the shardings of its arguments."""
    text = exported.mlir_module()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>", text)
    signature = re.search(r"func\.func public @main\((.*?)\) -> ", text)[1]
    args = {name: spec for spec, name in ARG.findall(signature)}
    # The train step's state (state.*), or evaluation's parameters (params*).
    weights = {n: spec for n, spec in args.items() if n.startswith(("state", "params"))}
    c_attn = [
        spec
        for n, spec in weights.items()
        if n.startswith(("state.params", "params")) and "['c_attn']['kernel']" in n
    ]
    return {
        "platforms": list(exported.platforms),
        "module_bytes": len(exported.mlir_module_serialized),
        "devices": exported.nr_devices,
        "mesh": re.findall(r"sdy\.mesh @\w+ = <\[([^\]]*)\]>", text),
        "dots": len(dots),
        "bfloat16_dots": dots.count("bf16"),
        "loops": text.count("stablehlo.while"),
        "barriers": text.count("stablehlo.optimization_barrier"),
        "custom_calls": sorted(set(re.findall(r"call_target_name = \"(\w+)\"", text))),
        "weights": len(weights),
        "weights_on_fsdp": sum('"fsdp"' in spec for spec in weights.values()),
        "shardings": {
            "c_attn": c_attn[0] if c_attn else None,  # Block 0's (or the stacked).
            "step": args.get("state.step"),
            "batch": args.get("x_BT") or args.get("x_KbT"),
        },
    }


def collectives(step, args) -> dict[str, int]:
    """The collectives XLA inserts when it compiles the step for the CPU's 8
    devices: the partitioning the annotations ask of any platform."""
    hlo = step.lower(*args).compile().as_text()
    ops = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in ops}


def lowering_report() -> dict:
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for name, (model_changes, train_changes, mesh_name) in TRAIN_CASES.items():
        model_cfg = dataclasses.replace(MODEL, **model_changes)
        train_cfg = dataclasses.replace(TRAIN, **train_changes)
        mesh = make_mesh(mesh_name)
        step = program.make_train_step(model_cfg, train_cfg, mesh)
        args = train_args(model_cfg, train_cfg, mesh)
        exported = jax.export.export(step, platforms=PLATFORMS)(*args)
        report[name] = describe(exported)
        if name in ("adamw_2x4", "adamw_1"):
            report[name]["collectives"] = collectives(step, args)
    for name, (mesh_name, model_changes) in EVAL_CASES.items():
        model_cfg = dataclasses.replace(MODEL, **model_changes)
        mesh = make_mesh(mesh_name)
        rows = layout.batch_sharding(mesh, row_axis=1)
        x_KbT = spec((3, TRAIN.batch_size, MODEL.block_size), jnp.int32, rows)
        params = program.abstract_params(model_cfg, mesh)
        add_losses = program.make_eval_loss(model_cfg, mesh)
        total = spec((), jnp.float32, layout.replicated(mesh))
        exported = jax.export.export(add_losses, platforms=PLATFORMS)(
            params, total, x_KbT, x_KbT
        )
        report[name] = describe(exported)
    # Sampling runs on one device, from whole parameters (sharding.to_local).
    for name, (kv_cache, model_changes) in SAMPLE_CASES.items():
        model_cfg = dataclasses.replace(MODEL, **model_changes)
        key = jax.random.PRNGKey(0)
        params = jax.eval_shape(lambda: lecture.init_params(model_cfg, key))  # noqa: B023
        exported = jax.export.export(generate.generate, platforms=PLATFORMS)(
            lecture.make_model(model_cfg).apply,
            params,
            spec((2, 3), jnp.int32),
            spec((2,), jnp.uint32),
            block_size=MODEL.block_size,
            max_new_tokens=2 * MODEL.block_size,  # Past a full cache: refills.
            temperature=0.8,
            top_k=10,
            top_p=0.9,
            kv_cache=kv_cache,
            rolling=model_cfg.position == "rope",
        )
        report[name] = describe(exported)
    return report


# --- The tests, on the subprocess's report -------------------------------------


@pytest.fixture(scope="module")
def report():
    return subprocess_report(__file__, timeout=300)


@pytest.mark.parametrize("case", CASES)
def test_program_lowers_for_tpu_and_cuda(report, case):
    r = report[case]
    assert r["platforms"] == list(PLATFORMS) and r["module_bytes"] > 0
    on_mesh = case.endswith("2x4")
    assert r["devices"] == (8 if on_mesh else 1)
    if case.startswith(("adamw", "eval")):
        assert r["mesh"] == (
            ['"data"=2, "fsdp"=4'] if on_mesh else ['"data"=1, "fsdp"=1']
        )
    assert r["custom_calls"] == []  # XLA's own ops: nothing this CPU lacks.


@pytest.mark.parametrize("case", BFLOAT16_CASES)
def test_matmuls_compute_in_bfloat16(report, case):
    """The blocks' matmuls take bfloat16 operands; the float32 model's, none."""
    assert report[case]["bfloat16_dots"] > 0, report[case]


def test_float32_model_has_the_same_matmuls_none_in_bfloat16(report):
    f32, bf16 = report["float32_2x4"], report["adamw_2x4"]
    assert f32["dots"] == bf16["dots"] and f32["bfloat16_dots"] == 0


def test_fsdp_mesh_shards_the_state_and_splits_the_batch(report):
    """On 2x4, every array of the state but the three step counters is split
    on the fsdp axis (c_attn's kernel [32, 96] by columns), and the batch's
    rows over both axes; on one device, nothing is split."""
    for case in ("adamw_2x4", "accum_2x4", "remat_2x4", "einsum_dropout_2x4"):
        r = report[case]
        assert r["weights"] == 48 and r["weights_on_fsdp"] == 48 - 3, (case, r)
        assert r["shardings"] == {
            "c_attn": '[{}, {"fsdp"}]',
            "step": "[]",
            "batch": '[{"data", "fsdp"}, {}]',
        }
    for case in ("scan_2x4", "remat_scan_2x4", "muon_scan_2x4"):  # [L, 32, 96].
        assert report[case]["shardings"]["c_attn"] == '[{}, {}, {"fsdp"}]'
    assert report["eval_2x4"]["weights_on_fsdp"] == report["eval_2x4"]["weights"] > 0
    assert report["eval_2x4"]["shardings"]["batch"] == '[{}, {"data", "fsdp"}, {}]'
    for case in ("adamw_1", "muon_1", "eval_1"):
        assert report[case]["weights"] > 0 and report[case]["weights_on_fsdp"] == 0
    assert report["adamw_1"]["shardings"]["c_attn"] == "[{}, {}]"


def test_fsdp_annotations_partition_into_collectives(report):
    """Compiled for the 8 CPU devices, the 2x4 step gathers parameters and
    reduces gradients; on one device nothing is communicated."""
    mesh, one = report["adamw_2x4"]["collectives"], report["adamw_1"]["collectives"]
    assert mesh["all-gather"] > 0, mesh
    assert mesh["reduce-scatter"] + mesh["all-reduce"] > 0, mesh  # XLA's choice.
    assert sum(one.values()) == 0, one


def test_remat_recomputes_and_scan_loops_over_the_layers(report):
    plain, remat = report["adamw_2x4"], report["remat_2x4"]
    assert remat["dots"] > plain["dots"] and remat["barriers"] > 0 == plain["barriers"]
    scan, remat_scan = report["scan_2x4"], report["remat_scan_2x4"]
    assert scan["loops"] > plain["loops"] == 0  # The layers: one loop, not L copies.
    assert scan["dots"] < plain["dots"]
    assert remat_scan["dots"] > scan["dots"]  # The forward again, in the backward loop.


def test_muon_orthogonalises_with_matmuls_of_its_own(report):
    """Newton-Schulz iterations: float32 matmuls beyond AdamW's step's."""
    for muon, adamw in [("muon_2x4", "adamw_2x4"), ("muon_scan_2x4", "scan_2x4")]:
        extra = report[muon]["dots"] - report[adamw]["dots"]
        assert (
            extra > 0
            and report[muon]["bfloat16_dots"] == report[adamw]["bfloat16_dots"]
        )


def test_grad_accumulation_loops_over_micro_batches(report):
    assert report["accum_2x4"]["loops"] > report["adamw_2x4"]["loops"]


def test_sampling_with_the_cache_prefills_then_steps(report):
    """The cached program: the prompt's segment and its token loop, then the
    refills' loop with theirs; without the cache, one loop over the window."""
    assert report["sample_kv_cache"]["loops"] == 3, report["sample_kv_cache"]
    assert report["sample_window"]["loops"] == 1


# --- benchmarks/accelerator.py, at --smoke size --------------------------------


def test_accelerator_script_smoke_run(tmp_path, corpus_path):
    """Every stage runs and reports (one test: under pytest-xdist a module's
    fixture runs once per worker, and this run takes a minute)."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/accelerator.py",
            "--smoke",
            f"--out={tmp_path}",
            f"--data_path={corpus_path}",
            "--target_loss=4.0",  # Reached within the smoke run's 20 steps.
        ],
        check=False,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=1000,  # Its own budget is 900 s; about a minute on a quiet CPU.
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "accelerator.json").read_text())
    table = (tmp_path / "accelerator.md").read_text()
    assert done.stdout.endswith(table + "\n")  # Printed, as written.
    assert "--smoke: tiny sizes" in table
    assert report["smoke"] and report["machine"]["backend"] == "cpu"
    assert report["machine"]["jax"] == jax.__version__
    stages = report["stages"]
    assert set(stages) == {"tests", "recipe", "attention", "gpt2", "sample"}
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage)

    tests = stages["tests"]
    assert tests["passed"] == tests["tests"] >= 1 and tests["failed"] == 0

    # The recipe: stopped at the first evaluation at or below the target loss.
    (run,) = stages["recipe"]["runs"]
    vals = run["val_losses"]  # [step, seconds since the command started, val loss]
    steps, seconds, losses = zip(*vals)
    assert steps[0] == 0 and list(seconds) == sorted(seconds)
    first = next(v for v in vals if v[0] > 0 and v[2] <= 4.0)  # After training.
    assert (run["step_at_target"], run["time_to_target_s"]) == (first[0], first[1])
    assert vals[-1] == first  # No evaluation after it: the run was stopped.
    assert run["ms_per_step"] > 0 and run["mfu_percent"] > 0
    assert run["best_val_loss"] == min(losses)

    # Attention: cuDNN's is refused in one line off a GPU.
    rows = {r["attention"]: r for r in stages["attention"]["rows"]}
    for attention in ("einsum", "dot_product"):
        assert rows[attention]["status"] == "ok"
        assert rows[attention]["ms_per_step"] > 0 and rows[attention]["mfu_percent"] > 0
    assert rows["cudnn"]["status"] == "refused"
    assert rows["cudnn"]["message"].startswith(
        "error: --attention=cudnn needs an NVIDIA GPU, and this run has cpu"
    )

    # GPT-2's step: the batch chosen from the memory analysis, up to --max_batch=4.
    for row, remat in zip(stages["gpt2"]["rows"], (False, True)):
        assert row["remat"] == remat and row["status"] == "ok"
        assert row["batch_size"] == 4 and "MiB per sequence" in row["auto_batch"]
        assert row["mfu_percent"] > 0

    # Sampling: batch 1 and 8, with and without the KV cache.
    got = {(r["batch"], r["kv_cache"]) for r in stages["sample"]["rows"]}
    assert got == {(1, True), (1, False), (8, True), (8, False)}
    assert all(r["tokens_per_s"] > 0 for r in stages["sample"]["rows"])


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    print(json.dumps(lowering_report()))
