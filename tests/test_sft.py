"""Supervised fine-tuning on conversations: prepared rows (prepare_chat), packed
attention and positions (model.py), the masked loss (train.py), batches of
rows (datasets/rows.py), and a fine-tune from a run's workdir that resumes
bit for bit."""

import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver
from conftest import REPO

from jaxgpt import lecture, main, sharding, train
from jaxgpt.config import ModelConfig
from jaxgpt.datasets import (
    chat_tasks,
    chat_template,
    conversations,
    prepare,
    rows,
    token_file,
)
from jaxgpt.hub import tokenizer_io
from jaxgpt.run import checkpoint as ckpt
from jaxgpt.run import cli, program
from jaxgpt.run.configs import DataConfig, RunConfig

# --- Packed rows in the model ----------------------------------------------------


def tiny(**kw) -> ModelConfig:
    return ModelConfig(
        **{"vocab_size": 32, "block_size": 24, "n_layer": 1, "n_head": 2, "n_embd": 16}
        | kw
    )


@pytest.mark.parametrize(
    "position,attention",
    [("learned", "dot_product"), ("learned", "einsum"), ("rope", "dot_product")],
)
def test_packed_conversations_see_only_themselves(position, attention):
    """Logits of each conversation in a packed row (with padding) equal its
    logits alone: attention stays within it and positions restart at it."""
    cfg = tiny(position=position, attention=attention)
    apply = lecture.make_model(cfg).apply
    params = {"params": lecture.init_params(cfg, jax.random.PRNGKey(0))}
    rng = np.random.default_rng(0)
    lengths = [7, 5, 9]  # And 3 tokens of padding: T = 24.
    pieces = [rng.integers(0, 32, n) for n in lengths]
    x_BT = np.concatenate([*pieces, np.zeros(3, np.int64)])[None].astype(np.int32)
    seg_BT = np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3)]
    )[None].astype(np.int32)
    pos_BT = conversations.segment_positions(seg_BT)
    packed = apply(params, jnp.asarray(x_BT), seg_BT=seg_BT, pos_BT=pos_BT)
    start = 0
    for piece in pieces:
        alone = apply(params, jnp.asarray(piece[None], jnp.int32))
        got = packed[:, start : start + len(piece)]
        chex.assert_trees_all_close(got, alone, atol=1e-5, rtol=1e-5)
        start += len(piece)
    unpacked = apply(params, jnp.asarray(x_BT))  # Without segments: one sequence.
    assert not np.allclose(unpacked[:, 7:12], packed[:, 7:12], atol=1e-3)


def numpy_masked_mean(logits_BTV, y_BT, w_BT) -> float:
    logits = np.asarray(logits_BTV, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce_BT = -np.take_along_axis(logp, y_BT[..., None], -1)[..., 0]
    return float((ce_BT * w_BT).sum() / max(w_BT.sum(), 1))


def test_masked_loss_is_the_mean_over_all_micro_batches_masked_tokens():
    """accumulate's loss with `packed`: sum(ce * w) / max(sum(w), 1) over the
    whole batch (micro-batches summed first: rows with few masked tokens
    weigh less), and its gradient that of this loss."""
    cfg = tiny()
    apply = lecture.make_model(cfg).apply
    params = lecture.init_params(cfg, jax.random.PRNGKey(1))
    params = jax.tree.map(lambda p: 5 * p, params)  # Losses far from log(V).
    rng = np.random.default_rng(1)
    B, T = 4, 12
    x_BT = rng.integers(0, 32, (B, T)).astype(np.int32)
    y_BT = rng.integers(0, 32, (B, T)).astype(np.int32)
    w_BT = (rng.random((B, T)) < 0.3).astype(np.float32)
    w_BT[0] = 1.0  # Row 0: every token; the others: few.
    seg_BT = np.ones((B, T), np.int32)
    pos_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    packed = {"w_BT": w_BT, "seg_BT": seg_BT, "pos_BT": pos_BT}
    key = jax.random.PRNGKey(2)
    logits = apply({"params": params}, x_BT, seg_BT=seg_BT, pos_BT=pos_BT)
    expected = numpy_masked_mean(logits, y_BT, w_BT)
    accumulate = jax.jit(train.accumulate, static_argnums=(0, 5))
    for n_micro in (1, 2):
        loss, grads = accumulate(apply, params, x_BT, y_BT, key, n_micro, packed)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    micro_means = [numpy_masked_mean(logits[a::2], y_BT[a::2], w_BT[a::2])
                   for a in (0, 1)]  # fmt: skip
    assert abs(np.mean(micro_means) - expected) > 1e-2  # Not a mean of means.

    def direct(p):
        out = apply({"params": p}, x_BT, seg_BT=seg_BT, pos_BT=pos_BT)
        ce = jax.nn.log_softmax(out)[jnp.arange(B)[:, None], jnp.arange(T), y_BT]
        return -(ce * w_BT).sum() / w_BT.sum()

    want = jax.grad(direct)(params)  # float32 sums in another order: rtol 2e-3.
    chex.assert_trees_all_close(grads, want, rtol=2e-3, atol=1e-4)
    zero = dict(packed, w_BT=np.zeros_like(w_BT))  # Nothing to learn: loss 0.
    assert float(accumulate(apply, params, x_BT, y_BT, key, 2, zero)[0]) == 0.0


# --- Preparation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """200 conversations of the generated task."""
    folder = tmp_path_factory.mktemp("chats")
    records, _ = chat_tasks.make_splits(n_train=200, n_test=10, seed=0)
    path = folder / "train.jsonl"
    conversations.write_conversations(path, records)
    return path


def test_prepare_writes_rows_mask_and_segments(chat_file, tmp_path):
    cfg = DataConfig(dataset="chat", data_dir=str(tmp_path), data_path=str(chat_file))
    folder = prepare.prepare(cfg, block_size=96)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "meta.json",
        "train.bin",
        "train_mask.bin",
        "train_segments.bin",
        "val.bin",
        "val_mask.bin",
        "val_segments.bin",
    ]  # fmt: skip  (no temporary files left)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["block_size"] == 96 and meta["tokenizer"]["name"] == "chat"
    assert meta["train_conversations"] + meta["val_conversations"] == 200
    assert meta["val_conversations"] == 20  # One in 10.
    assert (meta["cut_conversations"], meta["dropped_conversations"]) == (0, 0)
    dataset = prepare.ensure(cfg, block_size=96)  # Read back, not prepared again.
    tok = dataset.tokenizer
    assert isinstance(tok, tokenizer_io.ChatTokenizer)
    assert tok.base.name == "char" and tok.vocab_size == tok.base.vocab_size + 4
    split = rows.rows_of(dataset)["train"]
    assert len(split) == meta["train_rows"]
    # The rows hold exactly the train conversations, each rendered with its mask.
    records = conversations.read_conversations(chat_file)
    ids, masks = chat_template.render_all(tok, records)
    rendered = {tuple(i): m.tolist() for i, m in zip(ids, masks)}
    found = 0
    for r in range(len(split)):
        row = slice(r * split.length, (r + 1) * split.length)
        tokens, mask = np.asarray(split.tokens[row]), np.asarray(split.mask[row])
        segments = np.asarray(split.segments[row])
        for s in range(1, segments.max() + 1):
            where = segments == s
            assert rendered[tuple(tokens[where])] == mask[where].tolist()
            found += 1
        assert not mask[segments == 0].any()  # Padding is never learned.
    assert found == meta["train_conversations"]
    assert int(np.asarray(split.mask).sum()) == meta["train_masked_tokens"]
    again = prepare.ensure(cfg, block_size=64)  # Other rows: prepared again.
    assert again.block_size == 64


def test_a_bad_conversation_is_one_error_line_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'
    path.write_text(good + '\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.datasets.prepare", "--dataset=bad",
         f"--data_dir={tmp_path / 'data'}", f"--data_path={path}", "--tokenizer=char"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert f"{path}:2" in lines[0] and "no assistant turn" in lines[0]
    assert not (tmp_path / "data").exists()


def test_rows_batches_are_whole_rows_with_shifted_mask_and_positions(tmp_path):
    L = 6
    tokens = np.arange(3 * L, dtype=np.uint16)
    mask = np.tile(np.array([0, 1, 1, 0, 0, 1], np.uint8), 3)
    segments = np.tile(np.array([1, 1, 1, 2, 2, 0], np.uint16), 3)
    files = {}
    for name, array in {"t": tokens, "m": mask, "s": segments}.items():
        (tmp_path / f"{name}.bin").write_bytes(array.tobytes())
        files[name] = token_file.TokenFile(tmp_path / f"{name}.bin", array.dtype)
    split = rows.Rows(files["t"], files["m"], files["s"], L)
    draw = lambda: rows.get_rows(split, np.random.default_rng([7, 3]), 4)
    x_BT, y_BT, packed = draw()
    chex.assert_trees_all_equal((x_BT, y_BT, packed), draw())  # Of (seed, step).
    assert x_BT.shape == (4, L - 1) and set(x_BT[:, 0] % L) == {0}  # Whole rows.
    np.testing.assert_array_equal(y_BT, x_BT + 1)
    np.testing.assert_array_equal(packed["w_BT"][0], [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(packed["seg_BT"][0], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(packed["pos_BT"][0], [0, 1, 2, 0, 1])


# --- Fine-tuning a run's model end to end -----------------------------------------

TINY = {
    "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 96, "batch_size": 4,
    "warmup_iters": 0, "eval_iters": 1, "log_interval": 2, "max_new_tokens": 2,
    "tensorboard": False,
}  # fmt: skip


def run_main(**settings) -> None:
    with flagsaver.flagsaver(**{**TINY, **settings}):
        assert main.main(["jaxgpt.main"]) == 0


@pytest.fixture(scope="module")
def finetunes(chat_file, tmp_path_factory):
    """A base run on the conversations' text (characters), then fine-tunes of
    it on the conversations: 6 steps at once, and 3 + 3 resumed."""
    cli.FLAGS.mark_as_parsed()
    tmp = tmp_path_factory.mktemp("sft")
    text = tmp / "text.txt"
    records = conversations.read_conversations(chat_file)
    text.write_text("\n".join(m["content"] for r in records for m in r) * 3)
    data_dir = str(tmp / "data")
    run_main(
        workdir=str(tmp / "base"), data_path=str(text), dataset="text",
        data_dir=data_dir, max_iters=4, lr_decay_iters=4, eval_interval=4,
    )  # fmt: skip
    sft = {
        "init_from": str(tmp / "base"), "data_path": str(chat_file), "dataset": "chat",
        "data_dir": data_dir, "max_iters": 6, "lr_decay_iters": 6, "eval_interval": 3,
        "learning_rate": 1e-3, "prompt": "<|user|>What is 1 + 2?<|end|><|assistant|>",
    }  # fmt: skip
    run_main(workdir=str(tmp / "once"), **sft)
    run_main(workdir=str(tmp / "twice"), stop_at=3, **sft)
    run_main(workdir=str(tmp / "twice"), **sft)
    return tmp


def read_run(workdir):
    mesh = sharding.make_mesh(1, 1)
    from jaxgpt.hub import load

    run = RunConfig(workdir=str(workdir))
    return load.load_model(run, ckpt.LATEST, mesh)


def test_finetune_grows_the_vocabulary_for_the_chat_tokens(finetunes):
    base_cfg, base_params, base_tok = read_run(finetunes / "base")
    cfg, params, tok = read_run(finetunes / "once")
    assert isinstance(tok, tokenizer_io.ChatTokenizer)
    assert tok.base.to_json() == base_tok.to_json()
    assert cfg.vocab_size == base_cfg.vocab_size + 4 == tok.vocab_size
    assert params["wte"]["embedding"].shape == (cfg.vocab_size, cfg.n_embd)
    moved = params["wte"]["embedding"][: base_cfg.vocab_size]
    assert not np.allclose(moved, base_params["wte"]["embedding"])  # Trained.


def test_finetune_resumes_bit_for_bit(finetunes):
    _, once, _ = read_run(finetunes / "once")
    _, twice, _ = read_run(finetunes / "twice")
    chex.assert_trees_all_equal(once, twice)
    losses = [
        [json.loads(line) for line in (finetunes / w / "metrics.jsonl").open()]
        for w in ("once", "twice")
    ]
    assert losses[0] == losses[1] and {r["step"] for r in losses[0]} == {0, 3, 6}


# --- A Hugging Face model with its own chat template ------------------------------


@pytest.fixture(scope="module")
def chatml_llama(tmp_path_factory):
    """A random Llama-family model in Hugging Face's layout with a ChatML
    template and tokenizer (SmolLM2-Instruct's kind)."""
    from test_chat_template import make_folder

    from jaxgpt.hub import load

    folder = make_folder(tmp_path_factory.mktemp("llama"), "chatml")
    n_ids = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = ModelConfig(
        vocab_size=n_ids, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
        bias=False, position="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=32,
        tie_embeddings=True, dropout=0.0,
    )  # fmt: skip
    params = lecture.init_params(cfg, jax.random.PRNGKey(3))
    load.write_model("llama", params, cfg, str(folder))
    return folder


def test_a_model_folder_brings_its_template(chatml_llama, chat_file, tmp_path):
    """Prepared with --init_from's folder: its ChatML template renders the
    rows, the masked tokens are each reply and its <|im_end|>, and the model
    fine-tunes on them with its own vocabulary."""
    cfg = DataConfig(dataset="chatml", data_dir=str(tmp_path), data_path=str(chat_file))
    folder = prepare.prepare(cfg, block_size=128, init_from=str(chatml_llama))
    dataset = prepare.load(folder)
    assert dataset.meta["chat_template"] == str(chatml_llama)
    assert dataset.tokenizer.name == "hf"
    split = rows.rows_of(dataset)["train"]
    _, y_BT, packed = split.read(np.arange(3))
    replies = {m["content"] for r in conversations.read_conversations(chat_file)
               for m in r if m["role"] == "assistant"}  # fmt: skip
    for b in range(3):
        seg_T, w_T = np.append(packed["seg_BT"][b], 0), packed["w_BT"][b]
        for s in range(1, seg_T.max() + 1):
            learned = y_BT[b][(w_T == 1) & (seg_T[1:] == s)]
            text = dataset.tokenizer.decode(learned)
            assert text.endswith("<|im_end|>") and text[:-10] in replies, text
    run_main(
        workdir=str(tmp_path / "wd"), init_from=str(chatml_llama), dataset="chatml",
        data_dir=str(tmp_path), data_path=str(chat_file), block_size=128,
        max_iters=2, lr_decay_iters=2, eval_interval=2, prompt="Hi",
    )  # fmt: skip
    saved = ckpt.read_meta(tmp_path / "wd")
    assert saved["model"]["vocab_size"] == dataset.tokenizer.vocab_size


SMOLLM2_135M = {  # config.json of HuggingFaceTB/SmolLM2-135M(-Instruct).
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    "hidden_act": "silu",
}  # fmt: skip


def test_the_smollm2_recipe_parses_and_lowers(monkeypatch):
    """experiments/chat_sft_smollm2.cfg's run on SmolLM2-135M's config: its
    packed training step lowers (shapes only: no weights are downloaded)."""
    from jaxgpt.hub import llama

    monkeypatch.chdir(REPO)
    with flagsaver.flagsaver():
        cli.FLAGS(["jaxgpt.main", "--flagfile=experiments/chat_sft_smollm2.cfg"])
        cmd = cli.command()
        cli.FLAGS.unparse_flags()
    assert cmd.run.init_from == "HuggingFaceTB/SmolLM2-135M-Instruct"
    base = llama.config_from_hf(SMOLLM2_135M)
    model_cfg = ModelConfig(**{**base.to_dict(), **cmd.model_overrides()})
    assert model_cfg.block_size == 256 and model_cfg.kv_heads == 3
    mesh = sharding.make_mesh(1, 1)
    step = program.make_train_step(model_cfg, cmd.train, mesh, packed=True)
    state = program.abstract_state(model_cfg, cmd.train, mesh)
    B, T = cmd.train.batch_size, model_cfg.block_size
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    packed = {"w_BT": jax.ShapeDtypeStruct((B, T), jnp.float32),
              "seg_BT": ids, "pos_BT": ids}  # fmt: skip
    lowered = step.lower(state, ids, ids, jax.random.PRNGKey(0), packed)
    _, metrics = lowered.out_info
    assert metrics["loss"].shape == ()


def test_evaluation_is_the_masked_mean_over_all_its_rows(chat_file, tmp_path):
    from jaxgpt.config import TrainConfig

    data_cfg = DataConfig(dataset="c", data_dir=str(tmp_path), data_path=str(chat_file))
    dataset = prepare.ensure(data_cfg, block_size=96)
    cfg = tiny(vocab_size=dataset.tokenizer.vocab_size, block_size=96)
    train_cfg = TrainConfig(batch_size=4, grad_accum_steps=2, eval_iters=2)
    params = lecture.init_params(cfg, jax.random.PRNGKey(4))
    splits = rows.rows_of(dataset)
    root, mesh = train.root_key(5), sharding.make_mesh(1, 1)
    losses = rows.make_evaluate(cfg, train_cfg, splits, root, mesh)(params)
    apply = lecture.make_model(cfg).apply
    eval_stream = np.asarray(train.stream(root, "eval"))
    for name, split in splits.items():  # 4 batches of 2 rows, pooled.
        drawn = [rows.get_rows(split, train.host_rng(eval_stream, i), 2)
                 for i in range(4)]  # fmt: skip
        x, y = (np.concatenate([d[i] for d in drawn]) for i in (0, 1))
        packed = {k: np.concatenate([d[2][k] for d in drawn]) for k in drawn[0][2]}
        w = packed.pop("w_BT")
        logits = apply({"params": params}, x, **packed)
        expected = numpy_masked_mean(logits, y, w)
        np.testing.assert_allclose(losses[f"{name}_loss"], expected, rtol=1e-5)
