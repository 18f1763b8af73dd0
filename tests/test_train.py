import dataclasses
import json
import math
import os
import signal
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import data, lecture, sharding, tokenizer, train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import layout, loop, metrics, muon, program
from jaxgpt.run.configs import LoopConfig

MODEL = ModelConfig(
    vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True
)
SMALL = ModelConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=16)
ROOT = train.root_key(0)


def test_decay_mask_covers_matrices_only():
    state = train.create_state(MODEL, TrainConfig(), ROOT)
    mask = train.decay_mask(state.params)
    flat = {
        "/".join(k.key for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert flat["wte/embedding"] and flat["h_0/attn/c_attn/kernel"]
    assert flat["h_1/mlp/c_proj/kernel"]
    assert not flat["ln_f/scale"] and not flat["h_0/ln_1/scale"]
    assert not flat["h_0/attn/c_attn/bias"]
    # Every leaf: decayed exactly when it is 2-D.
    for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(state.params)):
        assert m == (p.ndim == 2)


def test_weight_decay_skips_masked_leaves():
    """With zero gradients, AdamW only shrinks the matrices, by lr * wd."""
    cfg = TrainConfig(
        learning_rate=0.1, min_lr=0.1, warmup_iters=0, weight_decay=0.5, grad_clip=0.0
    )
    state = train.create_state(MODEL, cfg, ROOT)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    update = jax.jit(train.make_optimizer(cfg).update)
    updates, _ = update(zeros, state.opt_state, state.params)
    new = optax.apply_updates(state.params, updates)
    for old, upd in zip(jax.tree.leaves(state.params), jax.tree.leaves(new)):
        factor = 1 - 0.1 * 0.5 if old.ndim == 2 else 1.0
        np.testing.assert_allclose(upd, old * factor, rtol=1e-6, atol=1e-7)


def test_lr_schedule_warmup_cosine_floor():
    cfg = TrainConfig(
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_iters=100,
        max_iters=1000,
        lr_decay_iters=800,
    )
    lr = train.lr_schedule(cfg)
    np.testing.assert_allclose(lr(0), 0.0)
    np.testing.assert_allclose(lr(50), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(lr(100), 1e-3, rtol=1e-5)
    mid = 100 + (800 - 100) // 2  # Cosine halfway: (peak + floor) / 2.
    np.testing.assert_allclose(lr(mid), (1e-3 + 1e-4) / 2, rtol=1e-4)
    np.testing.assert_allclose(lr(800), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(lr(999), 1e-4, rtol=1e-5)


@pytest.mark.parametrize("grad_clip,expected_norm", [(1.0, 1.0), (0.0, 400.0)])
def test_gradients_are_clipped_to_global_norm(grad_clip, expected_norm):
    """Adam's first moment after one step is (1 - beta1) * the (clipped) gradient."""
    tx = train.make_optimizer(TrainConfig(grad_clip=grad_clip))
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 200.0)}  # Global norm 400.
    _, opt_state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    norm = float(optax.tree.norm(mu)) / (1 - 0.9)
    assert math.isclose(norm, expected_norm, rel_tol=1e-5)


def batch_of(x_BT):
    """x_BT and its next tokens (wrapping around)."""
    return x_BT, jnp.roll(x_BT, -1, axis=1)


def test_train_step_overfits_one_batch():
    cfg = TrainConfig(learning_rate=3e-3, min_lr=3e-3, warmup_iters=0, weight_decay=0.0)
    step = train.make_train_step(MODEL, cfg)  # One device, no mesh: the lecture's.
    state = train.create_state(MODEL, cfg, ROOT)
    x, y = batch_of(jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 65))
    first = None
    for _ in range(300):
        state, metrics_ = step(state, x, y, ROOT)
        first = float(metrics_["loss"]) if first is None else first
    assert first > 3.5 and float(metrics_["loss"]) < 0.05
    assert int(state.step) == 300


def test_train_step_donates_its_state():
    cfg = TrainConfig()
    state = train.create_state(MODEL, cfg, ROOT)
    x, y = batch_of(jnp.zeros((2, 16), jnp.int32))
    old_leaf = jax.tree.leaves(state.params)[0]
    train.make_train_step(MODEL, cfg)(state, x, y, ROOT)
    assert old_leaf.is_deleted()


def test_train_step_draws_dropout_from_the_stream_at_its_step():
    """The step's loss is loss_and_grads under train.stream_key(root, "dropout", step)."""
    model_cfg = dataclasses.replace(SMALL, dropout=0.5)
    cfg = TrainConfig(warmup_iters=0)
    state = train.create_state(model_cfg, cfg, ROOT)
    state = state.replace(step=jnp.array(7, jnp.int32))  # Any step; here 7.
    params = jax.tree.map(jnp.copy, state.params)  # The step donates the state's.
    x, y = batch_of(jax.random.randint(jax.random.PRNGKey(0), (4, 8), 0, 65))
    _, got = train.make_train_step(model_cfg, cfg)(state, x, y, ROOT)
    apply_fn = lecture.make_model(model_cfg).apply
    loss_and_grads = jax.jit(train.loss_and_grads, static_argnums=0)
    loss_at = lambda key: loss_and_grads(apply_fn, params, x, y, key)[0]
    np.testing.assert_allclose(
        got["loss"], loss_at(train.stream_key(ROOT, "dropout", 7))
    )
    assert (
        abs(float(loss_at(train.stream_key(ROOT, "dropout", 8)) - got["loss"])) > 1e-4
    )


def test_grad_accumulation_equals_one_step_on_the_whole_batch():
    """4 micro-batches of 2 rows, scanned in one jitted step == 1 batch of 8."""
    x, y = batch_of(jax.random.randint(jax.random.PRNGKey(0), (8, 8), 0, 65))
    results = []
    for accum in (1, 4):
        cfg = TrainConfig(warmup_iters=0, grad_accum_steps=accum)
        step = train.make_train_step(SMALL, cfg)
        state = train.create_state(SMALL, cfg, ROOT)
        for _ in range(2):
            state, metrics_ = step(state, x, y, ROOT)
        results.append((state, metrics_))
    (whole, m_whole), (accum, m_accum) = results
    np.testing.assert_allclose(m_accum["loss"], m_whole["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_accum["grad_norm"], m_whole["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(accum.params, whole.params, atol=1e-5)


def test_micro_batches_are_strided_rows_with_folded_dropout_keys():
    """With dropout, micro-batch a is rows a, a + 2, ... under fold_in(key, a)."""
    model_cfg = dataclasses.replace(SMALL, dropout=0.5)
    params = train.create_state(model_cfg, TrainConfig(), ROOT).params
    apply_fn = lecture.make_model(model_cfg).apply
    x = jax.random.randint(jax.random.PRNGKey(0), (4, 8), 0, 65)
    y = jnp.roll(x, -1, axis=1)
    key = jax.random.PRNGKey(7)
    accumulate = jax.jit(train.accumulate, static_argnums=(0, 5))
    loss, grads = accumulate(apply_fn, params, x, y, key, 2)
    one = jax.jit(train.loss_and_grads, static_argnums=0)
    parts = [
        one(apply_fn, params, x[a::2], y[a::2], jax.random.fold_in(key, a))
        for a in (0, 1)
    ]
    expected_loss, expected_grads = jax.tree.map(lambda p, q: (p + q) / 2, *parts)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-6)
    # The keys matter: micro-batches under the step's own key give another loss.
    same_key = [one(apply_fn, params, x[a::2], y[a::2], key)[0] for a in (0, 1)]
    assert abs(float(sum(same_key)) / 2 - float(loss)) > 1e-4


def test_batches_come_from_the_batch_stream_at_each_step():
    tokens = np.arange(1000, dtype=np.int32)
    root = train.root_key(5)
    batches = train.make_batches(tokens, root, 4, 8)
    stream = train.stream(root, "batch")
    for step in (0, 1, 99):
        x, y = batches(step)
        want = data.get_batch(tokens, train.host_rng(stream, step), 4, 8)
        np.testing.assert_array_equal(x, want[0])
        np.testing.assert_array_equal(y, want[1])
    assert not np.array_equal(batches(0)[0], batches(1)[0])


@pytest.fixture(scope="module")
def tokens(corpus_text):
    text = corpus_text[:200_000]
    vocab = tokenizer.CharTokenizer.train(text).vocab
    train_tokens, val_tokens = data.split(tokenizer.CharTokenizer(vocab).encode(text))
    return vocab, {"train": train_tokens, "val": val_tokens}


class RecordingLog(metrics.TrainLog):
    """The real log, which also keeps every step's loss and evaluation."""

    def __init__(self, *args, on_step=None):
        super().__init__(*args)
        self.losses, self.evals, self.on_step = [], [], on_step

    def step(self, step, metrics_):
        super().step(step, metrics_)
        self.losses.append(float(metrics_["loss"]))
        if self.on_step:
            self.on_step(step)

    def evaluation(self, step, losses):
        super().evaluation(step, losses)
        self.evals.append({"step": step, **losses})


def run(workdir, tokens, stop_at=None, on_step=None, max_iters=12, **model_kw):
    """The training program of modes.training.run on a tiny model, stopped at `stop_at`."""
    vocab, splits = tokens
    model_cfg = ModelConfig(
        vocab_size=len(vocab),
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        dropout=0.1,
        **model_kw,
    )
    cfg = TrainConfig(batch_size=4, max_iters=max_iters, warmup_iters=2, eval_iters=2)
    loop_cfg = LoopConfig(max_iters, stop_at, eval_interval=4, log_interval=3)
    root, mesh = train.root_key(1337), sharding.make_mesh()
    meta = {"vocab": vocab}
    with ckpt.Checkpointer(workdir, meta) as checkpointer:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(program.abstract_state(model_cfg, cfg, mesh))
            assert jax.tree.leaves(state)[0].sharding == layout.replicated(mesh)
        else:
            state = program.create_state(model_cfg, cfg, root, mesh)
        schedule, start = train.lr_schedule(cfg), int(state.step)
        log = RecordingLog(
            workdir, model_cfg, cfg, loop_cfg, schedule, start, on_step=on_step
        )
        step = program.make_train_step(model_cfg, cfg, mesh)
        state, stopped_by = loop.train(
            state,
            loop_cfg,
            lambda state, x, y: step(state, x, y, root),
            program.make_batches(splits["train"], root, 4, 16, mesh),
            program.make_evaluate(model_cfg, cfg, splits, root, mesh),
            checkpointer,
            log,
        )
    assert meta == {"vocab": vocab}  # The checkpointer keeps its own copy.
    return state, {"losses": log.losses, "evals": log.evals, "stopped_by": stopped_by}


MODERN = {  # The architecture options (experiments/shakespeare_cpu_modern.cfg).
    "position": "rope", "norm": "rmsnorm", "norm_scale": False, "qk_norm": True,
    "mlp": "swiglu", "n_kv_head": 1, "tie_embeddings": False, "logit_cap": 15.0,
}  # fmt: skip


@pytest.mark.parametrize("model_kw", [{}, MODERN], ids=["gpt2", "modern"])
def test_resume_is_bitwise_exact(tmp_path, tokens, model_kw):
    """12 steps in one go == 6 steps (stopped by flag), then resumed to 12."""
    full_state, full = run(tmp_path / "full", tokens, **model_kw)
    _, first = run(tmp_path / "split", tokens, stop_at=6, **model_kw)
    assert first["stopped_by"] == "stop_at" and len(first["losses"]) == 6
    resumed_state, second = run(tmp_path / "split", tokens, **model_kw)
    assert full["losses"] == first["losses"] + second["losses"]  # Bitwise.
    assert full["evals"] == first["evals"] + second["evals"]
    chex.assert_trees_all_equal(full_state.params, resumed_state.params)
    chex.assert_trees_all_equal(full_state.opt_state, resumed_state.opt_state)


def test_sigterm_saves_and_resumes_exactly(tmp_path, tokens):
    _, full = run(tmp_path / "full", tokens, max_iters=10)

    def send_sigterm(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    _, first = run(tmp_path / "sig", tokens, on_step=send_sigterm, max_iters=10)
    assert first["stopped_by"] == "SIGTERM" and len(first["losses"]) == 5
    with ckpt.Checkpointer(tmp_path / "sig") as checkpointer:
        assert checkpointer.latest_step() == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handler restored.
    _, second = run(tmp_path / "sig", tokens, max_iters=10)
    assert full["losses"] == first["losses"] + second["losses"]


def test_metrics_jsonl_and_best_checkpoint(tmp_path, tokens):
    run(tmp_path, tokens)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert all({"step", "train_loss", "val_loss", "lr"} <= r.keys() for r in records)
    best = min(records, key=lambda r: r["val_loss"])
    with ckpt.Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step(ckpt.BEST) == best["step"]
        assert checkpointer.latest_step() == 12
        assert checkpointer.read_meta()["best_val_loss"] == best["val_loss"]
        assert checkpointer.best_val_loss == best["val_loss"]


def test_evaluation_batches_are_fixed_per_run(tokens):
    """Two evaluations of the same parameters agree; another seed draws other batches."""
    vocab, splits = tokens
    model_cfg = dataclasses.replace(SMALL, vocab_size=len(vocab))
    cfg = TrainConfig(batch_size=4, eval_iters=3)
    params = train.create_state(model_cfg, cfg, ROOT).params
    evaluate = train.make_evaluate(model_cfg, cfg, splits, ROOT)
    first = evaluate(params)
    assert first == evaluate(params) and set(first) == {"train_loss", "val_loss"}
    other = train.make_evaluate(model_cfg, cfg, splits, train.root_key(1))(params)
    assert other != first


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"batch_size": 0}, "--batch_size"),
        ({"max_iters": -5}, "--max_iters"),
        ({"min_lr": 1.0, "learning_rate": 0.1}, "--min_lr"),
        ({"warmup_iters": 500, "max_iters": 100}, "--lr_decay_iters"),
        ({"eval_iters": 0}, "--eval_iters"),
        ({"grad_accum_steps": 0}, "--grad_accum_steps"),
        ({"batch_size": 6, "grad_accum_steps": 4}, "--grad_accum_steps=4"),
    ],
)
def test_bad_train_config_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**kw)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"stop_at": 0}, r"--stop_at=0 must lie in \(0, --max_iters=10\]"),
        ({"stop_at": 11}, r"--stop_at=11 must lie in \(0, --max_iters=10\]"),
        ({"eval_interval": 0}, "--eval_interval=0 must be positive"),
        ({"log_interval": -1}, "--log_interval=-1 must be positive"),
        ({"max_loss_ratio": 1.0}, "--max_loss_ratio=1.0 must exceed 1"),
        ({"save_every_minutes": -1.0}, "--save_every_minutes=-1.0 and"),
    ],
)
def test_bad_loop_config_names_the_flag(kw, message):
    with pytest.raises(ConfigError, match=message):
        LoopConfig(max_iters=10, **kw)


def test_the_loop_ends_at_stop_at_else_max_iters():
    assert LoopConfig(max_iters=10).end_step == 10
    assert LoopConfig(max_iters=10, stop_at=4).end_step == 4


# --- --optimizer=muon ------------------------------------------------------------


def flat(tree) -> dict:
    return {
        "/".join(k.key for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_muon_orthogonalises_block_matrices_and_adamw_takes_the_rest():
    """One update from badly conditioned random gradients: each block kernel's
    update has nearly equal singular values, as Newton-Schulz makes them; every
    other leaf gets
    exactly the update --optimizer=adamw gives it."""
    cfg = TrainConfig(
        learning_rate=1e-2, min_lr=1e-2, warmup_iters=0, grad_clip=0, weight_decay=0
    )
    params = lecture.init_params(MODEL, ROOT)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    grads = treedef.unflatten(
        [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
    )
    updates = {}
    for name in ("muon", "adamw"):
        tx = muon.make_optimizer(dataclasses.replace(cfg, optimizer=name))
        updates[name] = flat(jax.jit(tx.update)(grads, tx.init(params), params)[0])
    matrices = [k for k in updates["muon"] if k.startswith("h_") and "kernel" in k]
    assert len(matrices) == 4 * MODEL.n_layer
    for name, update in updates["muon"].items():
        if name in matrices:
            sv = lambda m: np.linalg.svd(np.asarray(m), compute_uv=False)
            s, g = sv(update), sv(flat(grads)[name])
            # Newton-Schulz's quintic leaves singular values in about [0.68, 1.13].
            assert np.divide(*np.percentile(s, [90, 10])) < 1.7
            assert g.max() / g.min() > 2.5  # What it started from.
        else:
            np.testing.assert_array_equal(update, updates["adamw"][name])


@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer", "scan_layers"])
def test_muon_updates_are_optax_contrib_muons(stacked):
    """muon.py orthogonalises same-shaped matrices in one batch with constant
    coefficients; over four steps its updates are optax.contrib.muon's (with
    consistent_rms) up to float rounding, for per-layer and stacked [L, ...] kernels."""
    params = lecture.init_params(MODEL, ROOT)
    kernels = {  # Every block's kernels, by layer ...
        f"h_{i}": {
            part: {k: v["kernel"] for k, v in params[f"h_{i}"][part].items()}
            for part in ("attn", "mlp")
        }
        for i in range(MODEL.n_layer)
    }
    if stacked:  # ... or stacked over the layers, as --scan_layers keeps them.
        kernels = jax.tree.map(lambda *layers: jnp.stack(layers), *kernels.values())
    dims = lambda ps: jax.tree.map(
        lambda p: optax.contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1), ps
    )
    schedule = optax.linear_schedule(1e-2, 1e-3, 4)
    ref = optax.contrib.muon(
        schedule,
        beta=0.9,
        weight_decay=0.1,
        consistent_rms=0.2,
        muon_weight_dimension_numbers=dims,
    )
    ours = muon.muon(schedule, beta=0.9, weight_decay=0.1)
    state_ref, state_ours = ref.init(kernels), ours.init(kernels)
    leaves, treedef = jax.tree.flatten(kernels)
    for s in range(4):
        keys = jax.random.split(jax.random.PRNGKey(s), len(leaves))
        grads = treedef.unflatten(
            [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
        )
        u_ref, state_ref = jax.jit(ref.update)(grads, state_ref, kernels)
        u_ours, state_ours = jax.jit(ours.update)(grads, state_ours, kernels)
        chex.assert_trees_all_close(u_ours, u_ref, atol=1e-6, rtol=1e-4)
        assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(u_ref)) > 1e-4
        kernels = optax.apply_updates(kernels, u_ref)


def test_muon_trains(tokens):
    """A small model with --optimizer=muon learns the corpus's characters."""
    vocab, splits = tokens
    model_cfg = dataclasses.replace(MODEL, vocab_size=len(vocab))
    cfg = TrainConfig(
        optimizer="muon", learning_rate=4e-3, warmup_iters=5, max_iters=60, batch_size=8
    )
    tx = muon.make_optimizer(cfg)  # The engine's table: --optimizer=muon.
    step = train.make_train_step(model_cfg, cfg, tx)
    state = train.create_state(model_cfg, cfg, ROOT, tx=tx)
    batch = train.make_batches(splits["train"], ROOT, 8, 16)
    evaluate = train.make_evaluate(model_cfg, cfg, splits, ROOT)
    before = evaluate(state.params)["val_loss"]
    for s in range(80):
        state, _ = step(state, *batch(s), ROOT)
    after = evaluate(state.params)["val_loss"]
    p = np.bincount(splits["train"]) / len(splits["train"])
    unigram_entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))  # Context-free best.
    # Small initial weights: about uniform over the vocabulary, whatever the corpus.
    assert abs(before - np.log(len(vocab))) < 0.2 and after < unigram_entropy
    chex.assert_tree_all_finite(state.params)


def test_unknown_optimizer_names_the_flag():
    with pytest.raises(ConfigError, match="--optimizer"):
        TrainConfig(optimizer="sgd")


def test_the_engine_table_holds_every_optimizer_choice():
    """Every --optimizer a TrainConfig accepts is built by muon.OPTIMIZERS (what
    main passes), with no import adding to a table: the core's stays AdamW's."""
    hint = typing.get_type_hints(TrainConfig)["optimizer"]
    assert set(typing.get_args(hint)) == set(muon.OPTIMIZERS) == {"adamw", "muon"}
    assert train.OPTIMIZERS == {"adamw": train.adamw}  # muon is imported above.
    for name in muon.OPTIMIZERS:
        tx = muon.make_optimizer(TrainConfig(optimizer=name))
        assert jax.tree.leaves(tx.init({"w": jnp.ones((2, 2))}))


def test_the_core_table_names_the_engine_table_for_muon():
    """The core builds AdamW; --optimizer=muon without the engine's table is a
    ValueError naming the function that builds it."""
    with pytest.raises(ValueError, match=r"--optimizer=muon .*run\.muon\.make_optim"):
        train.make_optimizer(TrainConfig(optimizer="muon"))
    cfg = TrainConfig(optimizer="muon")
    with pytest.raises(ValueError, match="--optimizer=muon"):
        train.make_train_step(SMALL, cfg)  # The core's default: its own table.
    state = train.create_state(SMALL, cfg, ROOT, tx=muon.make_optimizer(cfg))
    assert isinstance(state.opt_state[1], optax.PartitionState)  # Muon's.
