"""Chat-task generation speed: prompts decoded together vs one at a time.

  python benchmarks/chat_eval.py --flagfile=experiments/shakespeare_cpu.cfg
  python benchmarks/chat_eval.py --flagfile=experiments/shakespeare.cfg
  python benchmarks/chat_eval.py --flagfile=experiments/gpt2_124m.cfg --bench_prompts=16 --bench_vocab=50261

The prompts are the generated chat task's (jaxgpt.datasets.chat_tasks' test
split, seed 0): the first --bench_prompts whose prompt leaves room for
--bench_new_tokens in the model's context, rendered with jaxgpt's chat tokens
over a character tokenizer of the task's characters. The model has the flags'
shape (n_layer, n_embd, block_size, ...), the tokenizer's vocabulary (or
--bench_vocab, e.g. GPT-2's 50,257 and the 4 chat tokens) and random
parameters; random weights end no reply, so there are no stop ids and every
reply is --bench_new_tokens greedy tokens. Both ways run the evaluation's own
path (jaxgpt.evals.generation.generate_ids): all prompts in --bench_rows rows
(default: all at once), then in one row, one prompt after another. Each is run
once to compile, then timed in --bench_repeats rounds in which the two take
turns (the median, and the best). A second table splits the batched run: the
prefills (Decoder.start_rows: the prompts of a padded length together, up to
Decoder.prefill_rows a call, the rows vmapped) and the steps (Decoder.step, every row);
"per call": per prompt, and per step. Last, the floor of a prefill: one
forward over every prompt token, packed into rows of block_size with no
padding (segment ids keep the prompts apart), as training's packed rows run.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from jaxgpt import lecture, model
from jaxgpt.config import ModelConfig
from jaxgpt.datasets import chat_tasks, chat_template, conversations
from jaxgpt.evals import generation
from jaxgpt.run import (
    cli,  # Defines the flags.
    decoding,
)
from jaxgpt.run.decoding import RowOptions
from jaxgpt.run.perf import cpu_speedups
from jaxgpt.tokenizer import CharTokenizer

_PROMPTS = flags.DEFINE_integer("bench_prompts", 64, "Prompts decoded.")
_NEW = flags.DEFINE_integer("bench_new_tokens", 16, "Greedy new tokens per prompt.")
_ROWS = flags.DEFINE_integer("bench_rows", 0, "Rows decoded together (0: all).")
_REPEATS = flags.DEFINE_integer("bench_repeats", 5, "Timed rounds of both ways.")
_VOCAB = flags.DEFINE_integer("bench_vocab", 0, "Vocabulary (0: the tokenizer's).")


def task_prompts(n: int, new_tokens: int, context: int):
    """(the chat tokenizer, the first n test prompts that leave room for
    new_tokens in the context)."""
    _, records = chat_tasks.make_splits(0, max(500, 8 * n), seed=0)
    chars = "".join(m["content"] for r in records for m in r["messages"])
    tok, _ = chat_template.add_chat_tokens(CharTokenizer.train(chars))
    prompts = [generation.prompt_ids(tok, tok, r["messages"]) for r in records]
    prompts = [p for p in prompts if len(p) + new_tokens <= context][:n]
    if len(prompts) < n:
        raise app.UsageError(
            f"only {len(prompts)} prompts leave room for --bench_new_tokens="
            f"{new_tokens} in a context of {context}: ask for fewer."
        )
    return tok, prompts


def timed(ways: dict, repeats: int) -> dict[str, list[float]]:
    """Each way's seconds in `repeats` rounds, the ways taking turns within a
    round (a machine's load then weighs on both alike), after one run of each
    to compile."""
    for fn in ways.values():
        fn()
    times = {way: [] for way in ways}
    for _ in range(repeats):
        for way, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[way].append(time.perf_counter() - t0)
    return times


def split_times(apply_fn, params, cfg, prompts, opts: RowOptions, repeats: int):
    """(seconds of the prefills, of the steps) of all prompts in one Decoder
    (its context cut as generate_ids cuts it), medians after a run to compile."""
    need = max(len(p) for p in prompts) + opts.max_tokens
    cut_cfg, cut_params = generation.fitted(
        cfg, params, decoding.padded_length(need, cfg.block_size)
    )
    cut_apply = lecture.apply_of(cut_cfg) if cut_cfg is not cfg else apply_fn
    decoder = decoding.Decoder(cut_apply, cut_params, cut_cfg, len(prompts))
    starts, steps = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        decoder.start_rows(range(len(prompts)), prompts, [opts] * len(prompts))
        t1 = time.perf_counter()
        for _ in range(opts.max_tokens - 1):
            decoder.step()
        starts.append(t1 - t0)
        steps.append(time.perf_counter() - t1)
    return statistics.median(starts[1:]), statistics.median(steps[1:])


def packed_forward(apply_fn, params, prompts, T: int, repeats: int) -> float:
    """Seconds of one forward over all prompts packed into rows of T tokens as
    training packs conversations (conversations.pack, in first-fit order,
    longest first), the median after a run to compile."""
    bins: list[list] = []
    for p in sorted(prompts, key=len, reverse=True):
        fits = [b for b in bins if sum(map(len, b)) + len(p) <= T]
        if fits:
            fits[0].append(p)
        else:
            bins.append([p])
    ordered = [np.asarray(p) for b in bins for p in b]
    packed = conversations.pack(ordered, [np.ones(len(p)) for p in ordered], T - 1)
    seg_BT = packed.segments_RL
    pos_BT = conversations.segment_positions(seg_BT)

    @jax.jit
    def forward(params, ids_BT, seg_BT, pos_BT):
        return apply_fn({"params": params}, ids_BT, seg_BT=seg_BT, pos_BT=pos_BT)

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, packed.tokens_RL, seg_BT, pos_BT))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv):
    del argv
    cpu_speedups()
    shape = cli.from_flags(ModelConfig, vocab_size=1)
    N, repeats = _NEW.value, _REPEATS.value
    tok, prompts = task_prompts(_PROMPTS.value, N, shape.block_size)
    cfg = cli.from_flags(ModelConfig, vocab_size=_VOCAB.value or tok.vocab_size)
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    apply_fn = lecture.apply_of(cfg)
    opts = RowOptions(N, temperature=0.0)
    P, rows = len(prompts), _ROWS.value or len(prompts)
    lengths = [len(p) for p in prompts]
    print(
        f"model: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} T={cfg.block_size}"
        f" V={cfg.vocab_size} ({model.count_params(params):,} params), {cfg.dtype};"
        f" {P} chat-task prompts of {min(lengths)}-{max(lengths)} tokens"
        f" (mean {np.mean(lengths):.1f}), {N} greedy new tokens each;"
        f" {jax.devices()[0].device_kind}"
    )
    ways = {}
    for way, r in (("together", rows), ("one at a time", 1)):
        ways[way] = lambda r=r: generation.generate_ids(
            apply_fn, params, cfg, prompts, opts, rows=r
        )
        assert all(len(new) == N for new in ways[way]()), "a reply ended early"
    times = timed(ways, repeats)
    median = {way: statistics.median(t) for way, t in times.items()}
    print(
        "| way | rows | seconds: median (best) | prompts/s | new tokens/s | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for way, r in (("together", rows), ("one at a time", 1)):
        s = median[way]
        print(
            f"| {way} | {r} | {s:.3f} ({min(times[way]):.3f}) | {P / s:.1f} |"
            f" {P * N / s:,.0f} | {median['one at a time'] / s:.1f}x |"
        )
    ratios = [a / t for t, a in zip(times["together"], times["one at a time"])]
    print(
        f"speed-up in each round: {', '.join(f'{x:.1f}x' for x in ratios)};"
        f" best times: {min(times['one at a time']) / min(times['together']):.1f}x"
    )
    prefill, steps = split_times(apply_fn, params, cfg, prompts, opts, repeats)
    print("| batched run's part | seconds | per call (ms) |")
    print("|---|---:|---:|")
    print(
        f"| {P} prefills (batched by padded length) | {prefill:.3f} | {prefill / P * 1e3:.2f} |"
    )
    print(f"| {N - 1} steps of {P} rows | {steps:.3f} | {steps / (N - 1) * 1e3:.2f} |")
    if cfg.kind.gpt:  # (Packed rows: GPT's segment ids.)
        floor = packed_forward(apply_fn, params, prompts, cfg.block_size, repeats)
        print(
            f"| floor: the {sum(lengths):,} prompt tokens in one packed forward |"
            f" {floor:.3f} | {floor / P * 1e3:.2f} |"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
