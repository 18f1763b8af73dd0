"""tools/grpo.py: group advantages, the policy-gradient loss's gradient (the
sampled tokens' -adv * grad log p, nothing else), and a two-step run from a
tiny chat model that saves a checkpoint its readers load."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver
from conftest import write_run

from jaxgpt import lecture, sharding, train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.datasets import chat_tasks, chat_template
from jaxgpt.hub import load as hub_load
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import cli, configs
from jaxgpt.tokenizer import CharTokenizer
from jaxgpt.tools import grpo

TRAIN, TEST = chat_tasks.make_splits(n_train=12, n_test=4, seed=0, tasks=("add",))
CHARS = "".join(json.dumps(r) for r in TRAIN + TEST)
TOK, _ = chat_template.add_chat_tokens(CharTokenizer.train(CHARS))
CFG = ModelConfig(
    vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16
)


def test_advantages_are_rewards_less_their_groups_mean():
    rewards_PG = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    want = np.array([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0.25, 0.25, 0.25, -0.75]])
    chex.assert_trees_all_close(grpo.advantages(rewards_PG), want, atol=1e-6)
    std = np.array([0.5, 0.0, np.sqrt(3) / 4])[:, None]  # Population std.
    chex.assert_trees_all_close(
        grpo.advantages(rewards_PG, normalize=True), want / (std + 1e-6), atol=1e-5
    )


def test_rows_put_the_reply_after_its_prompt_and_mask_only_its_tokens():
    x_NT, y_NT, w_NT = grpo.rows_of([[5, 6, 7], [4]], [[8, 9], [3, 2, 1]], 6)
    np.testing.assert_array_equal(x_NT, [[5, 6, 7, 8, 9, 0], [4, 3, 2, 1, 0, 0]])
    np.testing.assert_array_equal(y_NT, [[6, 7, 8, 9, 0, 0], [3, 2, 1, 0, 0, 0]])
    np.testing.assert_array_equal(w_NT, [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert grpo.row_length([[5, 6, 7]], [[8, 9]], 64) == 16
    assert grpo.row_length([[1] * 20], [[2] * 13], 64) == 32
    assert grpo.row_length([[1] * 60], [[2] * 13], 64) == 64


def test_the_loss_gradient_is_minus_adv_grad_log_p_of_the_sampled_tokens():
    """grad pg_loss = sum over sampled tokens of -adv * grad log p(token) / their
    count (each token's log p differentiated on its own); the targets at
    masked positions change nothing."""
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    apply = lecture.apply_of(cfg)
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x_NT = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
    y_NT = rng.integers(0, 11, (2, 8)).astype(np.int32)
    w_NT = np.zeros((2, 8), np.float32)
    w_NT[0, 3:5] = 1  # Row 0's reply: targets 3 and 4; row 1's: 1, 2 and 3.
    w_NT[1, 1:4] = 1
    adv_N = jnp.array([0.75, -0.5])

    loss_grad = jax.jit(jax.grad(grpo.pg_loss, argnums=1), static_argnums=0)
    grad = loss_grad(apply, params, x_NT, y_NT, w_NT, adv_N)

    @jax.jit
    @jax.grad
    def grad_log_p(p, n, t):  # One sampled token's log-probability, differentiated.
        logits_V = apply({"params": p}, x_NT[n][None])[0, t]
        return jax.nn.log_softmax(logits_V)[jnp.asarray(y_NT)[n, t]]

    want = jax.tree.map(jnp.zeros_like, params)
    for n, t in zip(*np.nonzero(w_NT)):
        g = grad_log_p(params, n, t)
        want = jax.tree.map(lambda a, b, n=n: a - adv_N[n] * b / w_NT.sum(), want, g)
    chex.assert_trees_all_close(grad, want, atol=1e-6, rtol=1e-4)

    other_y = np.where(w_NT > 0, y_NT, (y_NT + 1) % 11)  # Unsampled targets changed.
    grad2 = loss_grad(apply, params, x_NT, other_y, w_NT, adv_N)
    chex.assert_trees_all_close(grad2, grad, atol=1e-7)
    zero = loss_grad(apply, params, x_NT, y_NT, w_NT, jnp.zeros(2))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(zero)) == 0.0


# --- A run end to end -------------------------------------------------------------


def save_run(workdir, params) -> None:
    """A run's checkpoint holding `params` and the chat tokenizer."""
    tx = grpo.make_optimizer(TrainConfig(batch_size=1, warmup_iters=0))
    state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    write_run(workdir, CFG, TOK, state)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    for name, records in (("train.jsonl", TRAIN), ("test.jsonl", TEST)):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    params = lecture.init_params(CFG, jax.random.PRNGKey(1))
    save_run(tmp / "sft", params)
    cli.FLAGS.mark_as_parsed()
    return tmp, params


def run_main(tmp, **settings) -> None:
    flags = {
        "init_from": str(tmp / "sft"), "workdir": str(tmp / "rl"),
        "chat_data_path": str(tmp / "train.jsonl"),
        "chat_eval_path": str(tmp / "test.jsonl"), "batch_size": 2,
        "num_samples": 3, "temperature": 1.0, "top_k": 0, "max_iters": 2,
        "warmup_iters": 0, "learning_rate": 1e-2, "log_interval": 1,
    }  # fmt: skip
    with flagsaver.flagsaver(**{**flags, **settings}):
        assert grpo.main(["grpo"]) == 0


def test_two_steps_save_a_checkpoint_the_readers_load(files, capsys):
    tmp, params = files
    run_main(tmp)
    out = capsys.readouterr().out
    assert "step 0: exact match" in out and "step 1: reward" in out
    assert "step 2: exact match" in out and "; sampled " in out
    run = configs.RunConfig(workdir=str(tmp / "rl"))
    model_cfg, loaded, tok = hub_load.load_model(run, ckpt.LATEST, sharding.make_mesh())
    assert model_cfg == CFG and tok.to_json() == TOK.to_json()
    assert ckpt.read_meta(tmp / "rl")["step"] == 2
    chex.assert_trees_all_equal_shapes(loaded, params)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), loaded, params)
    assert max(jax.tree.leaves(moved)) > 0  # AdamW's weight decay at least.

    # The same command again resumes the complete run: nothing changes.
    run_main(tmp)
    assert "resuming from step 2" in capsys.readouterr().out
    assert ckpt.read_meta(tmp / "rl")["step"] == 2
    # Other settings on its workdir: refused, in one line.
    with pytest.raises(SystemExit) as refused:
        run_main(tmp, learning_rate=2e-2)
    line = str(refused.value.code)
    assert line.startswith("error: --workdir=") and "(train differ)" in line
    assert "--overwrite" in line and "\n" not in line


def test_a_run_cut_short_resumes_as_if_never_cut(files, monkeypatch):
    """Saved at each --eval_interval: a run stopped in step 1 and started again
    ends with the parameters of the run that never stopped, bit for bit."""
    tmp, _ = files
    run_main(tmp, workdir=str(tmp / "whole"))
    real = grpo.rollout

    def stops_in_step_1(*args):
        if args[6] == 1:  # (apply_fn, params, model_cfg, tok, task, root, step, ...)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(grpo, "rollout", stops_in_step_1)
    with pytest.raises(KeyboardInterrupt):
        run_main(tmp, workdir=str(tmp / "cut"), eval_interval=1)
    assert ckpt.read_meta(tmp / "cut")["step"] == 1
    monkeypatch.setattr(grpo, "rollout", real)
    run_main(tmp, workdir=str(tmp / "cut"), eval_interval=1)
    mesh = sharding.make_mesh()
    whole, cut = (
        hub_load.load_model(configs.RunConfig(workdir=str(tmp / w)), ckpt.LATEST, mesh)
        for w in ("whole", "cut")
    )
    chex.assert_trees_all_equal(whole[1], cut[1])


@pytest.mark.parametrize(
    "settings,words",
    [
        ({"chat_data_path": None}, "--chat_data_path"),
        ({"num_samples": 1}, "--num_samples=1"),
        ({"temperature": 0.0}, "--temperature=0.0"),
        ({"chat_data_path": "/nonexistent.jsonl"}, "is not a file"),
    ],
)
def test_bad_input_is_one_error_line(files, settings, words):
    tmp, _ = files
    with pytest.raises(SystemExit) as e:
        run_main(tmp, workdir=str(tmp / "refused"), **settings)
    line = str(e.value.code)
    assert line.startswith("error: ") and words in line and "\n" not in line
    assert not (tmp / "refused").exists()
