"""evals/generation.py: replies decoded together equal each decoded alone; the
chat task's exact match of a model whose replies are known by construction."""

import functools
import itertools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, write_run

from jaxgpt import lecture, sharding, train
from jaxgpt.config import ConfigError, ModelConfig, TrainConfig
from jaxgpt.datasets import chat_tasks, chat_template
from jaxgpt.evals import generation
from jaxgpt.run import configs, decoding, program
from jaxgpt.run.decoding import RowOptions
from jaxgpt.tokenizer import CharTokenizer

RECORDS = [
    chat_tasks.make_record("add", [17, 25], 0),  # 42: right.
    chat_tasks.make_record("add", [20, 22], 1),  # 42: right.
    chat_tasks.make_record("add", [10, 10], 0),  # 20: wrong.
    chat_tasks.make_record("spell", ["abc"], 1),  # a b c: wrong.
]
CHARS = "".join(json.dumps(r) for r in RECORDS) + "\n"
TOK, _ = chat_template.add_chat_tokens(CharTokenizer.train(CHARS))
GPT = ModelConfig(
    vocab_size=TOK.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16
)
ROPE = ModelConfig(
    vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16,
    position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False,
)  # fmt: skip
ANSWERING = ModelConfig(
    vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=64,
    tie_embeddings=False, bias=False, norm="rmsnorm",
)  # fmt: skip
ASSISTANT = TOK.special["<|assistant|>"]
# 7, 3 and 12 tokens: with up to 20 new ones, a context of 32 serves them all.
PROMPTS = [TOK.encode(s) for s in ("What is", "Add", "How do you s")]


@functools.cache
def random_model(cfg: ModelConfig):
    return cfg, lecture.apply_of(cfg), lecture.init_params(cfg, jax.random.PRNGKey(3))


@pytest.fixture(scope="module", params=[GPT, ROPE], ids=["gpt2", "llama"])
def model(request):
    return random_model(request.param)


def test_greedy_replies_in_a_cut_context_equal_the_whole_context(model):
    """Prompts of different lengths in one batch, in a context cut to their
    needs (32), get the greedy tokens of decoding.decode in the model's whole
    context (64), which tests/test_decoding.py checks against generate."""
    cfg, apply_fn, params = model
    opts = RowOptions(12, 0.0)
    out = generation.generate_ids(apply_fn, params, cfg, PROMPTS, opts)
    assert [len(new) for new in out] == [12] * 3
    assert out == decoding.decode(apply_fn, params, cfg, PROMPTS, opts)
    cut_cfg, cut_params = generation.fitted(cfg, params, 32)
    assert cut_cfg.block_size == 32
    if cfg.position == "learned":
        assert cut_params["wpe"]["embedding"].shape == (32, cfg.n_embd)


def test_sampled_replies_with_stops_do_not_depend_on_the_batch():
    """Sampled rows, stop ids, stop strings and max lengths: the texts of the
    prompts decoded together, in fewer rows, and each alone are the same."""
    cfg, apply_fn, params = random_model(GPT)
    opts = [RowOptions(20, 1.0, seed=1), RowOptions(14, 0.9, top_k=5, seed=2),
            RowOptions(18, 1.2, top_p=0.9, seed=3)]  # fmt: skip
    free = generation.generate_ids(apply_fn, params, cfg, PROMPTS, opts)
    stop_id = free[0][3]  # A token the first reply draws: it ends there.
    stop_string = TOK.decode(free[2][5:7])
    args = (apply_fn, params, cfg, TOK)
    stops = {"stop_ids": [stop_id], "stop_strings": [stop_string]}
    together = generation.generate(*args, PROMPTS, opts, **stops)
    two_rows = generation.generate(*args, PROMPTS, opts, **stops, rows=2)
    alone = [
        generation.generate(*args, [p], [o], **stops)[0] for p, o in zip(PROMPTS, opts)
    ]
    assert together == two_rows == alone
    until_stop = [f[: f.index(stop_id)] if stop_id in f else f for f in free]
    want = [generation.cut(TOK.decode(f), [stop_string]) for f in until_stop]
    assert together == want
    assert len(together[0]) == 3  # The stop id ended it, the stop string this:
    assert stop_string not in together[2] and together[2] in TOK.decode(free[2][:5])


def test_cut_ends_text_at_the_first_stop_string():
    assert generation.cut("ab\ncd.ef", ["\n", "."]) == "ab"
    assert generation.cut("abc", ["x", ""]) == "abc"
    assert generation.cut("a.b\n", [".", "\n"]) == "a"


def answering(cfg, chain: str, start: int):
    """A model that answers `chain` after token `start`: the blocks write
    nothing, embeddings are one-hot, and the untied head maps each token to the
    next of start, chain..., <|end|> (a greedy reply reads `chain`)."""
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(jnp.zeros_like, params)
    C, V = cfg.n_embd, cfg.vocab_size
    params["wte"]["embedding"] = jnp.eye(V, C)
    params["ln_f"]["scale"] = jnp.ones(C)
    head = np.zeros((C, V), np.float32)
    ids = [start, *TOK.encode(chain).tolist(), TOK.end_id]
    for a, b in itertools.pairwise(ids):
        head[a, b] = 1.0
    params["lm_head"]["kernel"] = jnp.asarray(head)
    return params


def test_exact_match_of_known_replies():
    """Every prompt ends with the assistant's header, which this model follows
    with "42" and the end of turn: the add records with answer 42 are right."""
    cfg = ANSWERING
    params = answering(cfg, "42", ASSISTANT)
    apply_fn = lecture.apply_of(cfg)
    got = generation.evaluate_chat_task(apply_fn, params, cfg, TOK, RECORDS)
    assert got == {"chat_acc": 0.5, "chat_add_acc": 2 / 3, "chat_spell_acc": 0.0}
    task = generation.prepare(TOK, TOK, RECORDS, cfg.block_size)
    assert task.stop_ids[0] == TOK.end_id and set(TOK.stop_ids) <= set(task.stop_ids)
    replies = generation.generate(
        apply_fn, params, cfg, TOK, task.prompts, task.opts, task.stop_ids
    )
    assert replies == ["42"] * 4
    assert [o.max_tokens for o in task.opts] == [2 + 8, 2 + 8, 2 + 8, 5 + 8]
    # A base model: the conversation's text, its reply ending at the line's end.
    base = CharTokenizer(TOK.base.vocab)
    params = answering(cfg, "42", TOK.encode("\n")[0])
    head = np.asarray(params["lm_head"]["kernel"]).copy()
    head[TOK.encode("2")[0]] = 0.0
    head[TOK.encode("2")[0], TOK.encode("\n")[0]] = 1.0  # "42\n".
    params["lm_head"]["kernel"] = jnp.asarray(head)
    got = generation.evaluate_chat_task(apply_fn, params, cfg, base, RECORDS)
    assert got["chat_acc"] == 0.5


def test_prompts_of_each_template():
    """A ChatTokenizer renders with its chat tokens; no template: the text."""
    messages = RECORDS[0]["messages"]
    ids = generation.prompt_ids(TOK, TOK, messages)
    assert ids.tolist() == chat_template.generation_prompt(TOK, messages).tolist()
    assert ids[-1] == TOK.special["<|assistant|>"]
    base = CharTokenizer(TOK.base.vocab)
    text = base.decode(generation.prompt_ids(base, None, messages).tolist())
    assert text == "What is 17 + 25?\n"


def test_bad_records_and_flags_are_one_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"messages": RECORDS[0]["messages"]}) + "\n")
    with pytest.raises(ConfigError, match=r'test.jsonl:1: it has no "answer"'):
        generation.read_records(path)
    with pytest.raises(ConfigError, match="is not a file"):
        generation.read_records(tmp_path / "none.jsonl")
    with pytest.raises(ConfigError, match="--eval_tasks=chat needs --chat_eval_path"):
        configs.EvalConfig(eval_tasks="chat")
    path.write_text(json.dumps(chat_tasks.make_record("spell", ["ñu"], 0)) + "\n")
    with pytest.raises(ConfigError, match="record 0: .*not in the vocabulary"):
        generation.prepare(TOK, TOK, generation.read_records(path), 64)


def save_run(workdir, cfg: ModelConfig, params) -> None:
    """A run's checkpoint holding `params` and the chat tokenizer."""
    state = program.create_state(
        cfg, TrainConfig(batch_size=1), train.root_key(0), sharding.make_mesh()
    )
    write_run(workdir, cfg, TOK, state.replace(params=params))


def test_the_command_prints_the_table(tmp_path):
    """python -m jaxgpt.evals.generation on a run's checkpoint; a missing run
    is one error line."""
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    save_run(tmp_path / "run", ANSWERING, answering(ANSWERING, "42", ASSISTANT))
    command = lambda *flags: subprocess.run(
        [sys.executable, "-m", "jaxgpt.evals.generation", *flags],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    done = command(f"--chat_eval_path={test}", f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| add | 3 | 0.6667 |\n| spell | 1 | 0.0000 |\n| all | 4 | 0.5000 |" in (
        done.stdout
    )
    assert re.search(r"4 greedy replies in [\d.]+s", done.stdout)
    done = command(f"--chat_eval_path={test}", f"--workdir={tmp_path / 'none'}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: --workdir=")


def test_with_chat_task_adds_the_exact_match(tmp_path):
    """--eval_tasks=chat: the run's evaluation gains chat_acc and each task's."""
    cfg = ANSWERING
    params = answering(cfg, "42", ASSISTANT)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    eval_cfg = configs.EvalConfig(
        eval_tasks="chat", chat_eval_path=str(test), eval_batch_size=len(RECORDS)
    )
    mesh = sharding.make_mesh()
    evaluate = generation.with_chat_task(
        lambda p: {"val_loss": 1.0}, cfg, TOK, eval_cfg, mesh
    )
    assert evaluate(params) == {
        "val_loss": 1.0, "chat_acc": 0.5, "chat_add_acc": 2 / 3, "chat_spell_acc": 0.0
    }  # fmt: skip
    hellaswag_only = configs.EvalConfig(eval_tasks="hellaswag")
    base = lambda p: {}
    assert generation.with_chat_task(base, cfg, TOK, hellaswag_only, mesh) is base
