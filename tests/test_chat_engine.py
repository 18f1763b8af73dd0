"""jaxgpt.chat: prompts from conversations, and the engine's batched replies."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

from jaxgpt import lecture, tokenizer
from jaxgpt.chat.engine import Engine
from jaxgpt.chat.model import ChatModel, PromptTooLong, stop_ids_of
from jaxgpt.config import ModelConfig
from jaxgpt.datasets import chat_template, tokenizer_train
from jaxgpt.hub import tokenizer_io
from jaxgpt.run import decoding
from jaxgpt.run.decoding import RowOptions

BASE = tokenizer.CharTokenizer("abcdefghijklmnopqrstuvwxyz .?!é\n")


def chat_model(tok, block_size=48, seed=0) -> ChatModel:
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2,
        n_embd=32,
    )  # fmt: skip
    template = tok if isinstance(tok, tokenizer_io.ChatTokenizer) else None
    return ChatModel(
        name="tiny",
        model_cfg=cfg,
        params=lecture.init_params(cfg, jax.random.PRNGKey(seed)),
        apply_fn=lecture.apply_of(cfg),
        tok=tok,
        template=template,
        stop_ids=frozenset(stop_ids_of(tok, template)),
    )


@pytest.fixture(scope="module")
def model():
    return chat_model(chat_template.add_chat_tokens(BASE)[0], block_size=64)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, slots=4)
    yield engine
    engine.close()


def reply_alone(model, prompt, opts):
    ids = decoding.decode(
        model.apply_fn, model.params, model.model_cfg, [prompt], opts, model.stop_ids
    )[0]
    return model.decode([i for i in ids if i not in model.stop_ids])


def test_chat_prompt_renders_the_template_and_drops_the_oldest_turns(model):
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"},
    ]
    ids, dropped = model.chat_prompt(messages, max_tokens=8)
    assert dropped == 0
    want = chat_template.generation_prompt(model.template, messages)
    assert ids.tolist() == want.tolist()
    assert model.decode(ids).endswith("<|user|>how are you?<|end|><|assistant|>")
    ids, dropped = model.chat_prompt(messages, max_tokens=30)  # 34 left of 64.
    assert dropped == 2 and len(ids) <= 34  # The first exchange (43 in all).
    assert model.decode(ids).startswith("<|system|>be brief.<|end|><|user|>how")
    system_only, dropped = model.chat_prompt(messages[:1], max_tokens=8)
    assert model.decode(system_only) == "<|system|>be brief.<|end|><|assistant|>"
    closed = messages[:3]  # A last assistant message is a turn like the others.
    text = model.decode(model.chat_prompt(closed, max_tokens=8)[0])
    assert text.endswith("<|assistant|>hi<|end|><|assistant|>")
    with pytest.raises(PromptTooLong, match="the last message takes"):
        model.chat_prompt([{"role": "user", "content": "a" * 70}], max_tokens=8)


def test_a_base_model_continues_the_text():
    base = chat_model(BASE)
    assert not base.chat and base.stop_ids == frozenset()  # Characters: no eos.
    ids, _ = base.chat_prompt([{"role": "user", "content": "abc"}], 4)
    assert base.decode(ids) == "abc\n"


def test_replies_equal_decoding_alone_whatever_runs_beside_them(model, engine):
    """8 requests at once on 4 rows: each reply equals its prompt decoded alone."""
    prompts = [model.chat_prompt([{"role": "user", "content": w}], 16)[0] for w in (
        "hi", "what is two and two?", "spell cat", "a", "bb", "hello there friend",
        "why?", "ok",
    )]  # fmt: skip
    opts = [RowOptions(16, 1.0, seed=s) for s in range(8)]
    requests = [None] * 8
    texts = [None] * 8

    def client(k):
        requests[k] = engine.submit(prompts[k], opts[k])
        texts[k] = requests[k].text()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == [reply_alone(model, p, o) for p, o in zip(prompts, opts)]
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    assert all(0 < r.completion_tokens <= 16 for r in requests)
    assert len(set(texts)) > 4  # Seeds differ, replies differ.


def test_stop_strings_cut_the_reply(model, engine):
    prompt = model.chat_prompt([{"role": "user", "content": "hi"}], 30)[0]
    opts = RowOptions(30, 1.0, seed=3)
    full = engine.submit(prompt, opts).text()
    stop = full[5:7]
    request = engine.submit(prompt, opts, stop=[stop, "zzzzzz"])
    assert request.text() == full[: full.index(stop)]
    assert request.finish_reason == "stop"


def test_a_cancelled_request_frees_its_row(model):
    model = dataclasses.replace(model, stop_ids=frozenset())  # Replies run on.
    one_row = Engine(model, slots=1)
    try:
        prompt = model.chat_prompt([{"role": "user", "content": "go"}], 8)[0]
        first = one_row.submit(prompt, RowOptions(10_000, 1.0))
        pieces = iter(first)
        next(pieces)
        first.cancel()
        assert "".join(pieces) is not None and first.finish_reason == "cancelled"
        second = one_row.submit(prompt, RowOptions(5, 0.0))
        assert second.text() == reply_alone(model, prompt, RowOptions(5, 0.0))
    finally:
        one_row.close()


def test_whole_characters_only():
    """A byte-level tokenizer's reply is yielded in whole characters: no piece
    ends inside a character's bytes (a random model's stray bytes that never
    form one decode as U+FFFD, as in the whole reply)."""
    bpe = tokenizer_io.BPETokenizer(tokenizer_train.train_bpe("héllo wörld " * 20, 260))
    model = chat_model(bpe, seed=1)
    engine = Engine(model, slots=2)
    try:
        prompt = np.asarray(bpe.encode("hé"), np.int32)
        request = engine.submit(prompt, RowOptions(40, 1.0, seed=2))
        pieces = list(request)
        assert not any(p.endswith("\ufffd") for p in pieces)
        ids = decoding.decode(
            model.apply_fn, model.params, model.model_cfg, [prompt],
            RowOptions(40, 1.0, seed=2),
        )[0]  # fmt: skip
        assert "".join(pieces) == bpe.decode(ids).rstrip("\ufffd")
    finally:
        engine.close()
