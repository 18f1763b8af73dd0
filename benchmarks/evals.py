"""Downstream evaluation speed: HellaSwag in the loop, and what lm-eval costs.

  python benchmarks/evals.py                                 # both models, 64 examples
  python benchmarks/evals.py --bench_models=cpu_recipe --bench_examples=1000
  python benchmarks/evals.py --eval_data_path=validation.jsonl   # real HellaSwag rows

Models, with random weights (the speed does not depend on them):
  cpu_recipe  experiments/shakespeare_cpu.cfg's GPT: 4 layers, 4 heads, 128
              wide, context 64, tiny shakespeare's 65 characters (0.8M params)
  gpt2_124m   GPT-2 124M's shape: 12 layers, 12 heads, 768 wide, context 1024,
              GPT-2's tokenizer
  tiny_gpt2   1 layer, 16 wide, context 64, GPT-2's tokenizer (a smoke test)
Rows: --eval_data_path's HellaSwag rows, else synthetic rows of HellaSwag's
lengths (contexts of 30-60 words, endings of 10-30; random words, seeded).

Paths, for each model: the in-loop evaluation (hellaswag.make_evaluate: one
compiled scan); with --bench_harness, for the GPT-2 tokenizer models, the same
rows as a local lm-eval task through lm_eval.simple_evaluate, with
jaxgpt.evals.harness.JaxGPTLM on the parameters and with the harness's HFLM (PyTorch)
on the model jaxgpt/hub/export.py writes. Each path runs once (compiling, warming
up), then --bench_repeats rounds in which the paths take turns. Reported,
medians over the rounds: examples/s, seconds per 1,000 loglikelihood
requests (4 per example), and of them the model's calls
(_loglikelihood_tokens) and the harness's own work (building requests,
metrics). The paths must agree on acc_norm.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from jaxgpt import lecture, model, sharding
from jaxgpt.config import ModelConfig
from jaxgpt.evals import hellaswag
from jaxgpt.hub import hf, load, tokenizer_io
from jaxgpt.run import cli  # Defines the flags (--eval_data_path, --eval_batch_size).
from jaxgpt.run.configs import EvalConfig
from jaxgpt.run.perf import cpu_speedups
from jaxgpt.tokenizer import CharTokenizer

_MODELS = flags.DEFINE_list(
    "bench_models", ["cpu_recipe", "gpt2_124m"], "cpu_recipe, gpt2_124m, tiny_gpt2."
)
_EXAMPLES = flags.DEFINE_integer("bench_examples", 64, "HellaSwag examples scored.")
_REPEATS = flags.DEFINE_integer(
    "bench_repeats", 3, "Warm in-loop evaluations timed (median and best)."
)
_HARNESS = flags.DEFINE_bool(
    "bench_harness", True, "Also time lm-eval (JaxGPTLM and HFLM) on GPT-2 models."
)

WORDS = (  # Synthetic HellaSwag text is drawn from these.
    "the a man woman person is are then he she they it of to and in on with"
    " takes puts holds walks runs jumps shows begins continues water ball"
    " kitchen bike camera dog hair floor table rope wall car tree guitar"
    " slowly again around while next over into down up quickly carefully"
)
SHAKESPEARE = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
SHAPES = {
    "cpu_recipe": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    "gpt2_124m": GPT2_124M,
    "tiny_gpt2": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64},
}


def model_and_tokenizer(name: str):
    tok = CharTokenizer(SHAKESPEARE) if name == "cpu_recipe" else None
    tok = tok or tokenizer_io.load_gpt2()
    bias = name != "cpu_recipe"  # GPT-2 has biases; the recipe trains without.
    cfg = ModelConfig(vocab_size=tok.vocab_size, bias=bias, **SHAPES[name])
    return cfg, lecture.init_params(cfg, jax.random.PRNGKey(0)), tok


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows in Rowan/hellaswag's schema with its lengths, of random words."""
    rng = np.random.default_rng(seed)
    words = WORDS.split()
    say = lambda lo, hi: " ".join(rng.choice(words, rng.integers(lo, hi)))
    return [
        {
            "activity_label": say(1, 3).capitalize(),
            "ctx_a": say(30, 60).capitalize() + ".",
            "ctx_b": say(3, 8),
            "endings": [say(10, 30) + "." for _ in range(4)],
            "label": str(rng.integers(4)),
        }
        for _ in range(n)
    ]


def in_loop(cfg, params, tok, rows, batch_rows: int):
    """A call running the in-loop evaluation: (seconds, model seconds, acc_norm)."""
    evaluate = hellaswag.make_evaluate(cfg, tok, rows, sharding.make_mesh(), batch_rows)

    def call():
        t0 = time.perf_counter()
        acc_norm = evaluate(params)["hellaswag_acc_norm"]
        seconds = time.perf_counter() - t0
        return seconds, seconds, acc_norm

    return call


def timed(lm):
    """Counts the seconds `lm` spends in its _loglikelihood_tokens."""
    inner, lm.model_seconds = lm._loglikelihood_tokens, 0.0

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        lm.model_seconds += time.perf_counter() - t0
        return out

    lm._loglikelihood_tokens = wrapper
    return lm


def through_harness(cfg, params, tok, rows, batch_rows: int):
    """Calls running the rows as a local lm-eval task through simple_evaluate,
    with JaxGPTLM and with HFLM on the exported model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from jaxgpt.evals import harness

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM: a line per cut.
    folder = Path(tempfile.mkdtemp(prefix="jaxgpt_bench_evals_"))
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    include = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (folder / "bench_hellaswag.yaml").write_text(
        f"include: {include}\ntask: bench_hellaswag\ntag: []\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    validation:"
        f" {folder / 'rows.jsonl'}\ntraining_split: null\n"
    )
    files = hf.tokenizer_files(tok)[0]
    load.write_model("gpt2", params, cfg, str(folder / "hf"), files)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lms = {
        "lm-eval, JaxGPTLM": harness.JaxGPTLM(loaded=(cfg, params, tok), batch_size=batch_rows),
        "lm-eval, HFLM on the export": HFLM(
            pretrained=str(folder / "hf"), batch_size=batch_rows, device="cpu",
            dtype="float32",
        ),
    }  # fmt: skip

    def runner(lm):
        def call():
            lm.model_seconds = 0.0
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["bench_hellaswag"], task_manager=manager,
                bootstrap_iters=0, log_samples=False,
            )  # fmt: skip
            acc_norm = out["results"]["bench_hellaswag"]["acc_norm,none"]
            return time.perf_counter() - t0, lm.model_seconds, acc_norm

        return call

    return {path: runner(timed(lm)) for path, lm in lms.items()}


def bench(name: str, cfg, params, tok, rows, batch_rows: int) -> None:
    """A first run of each path, then --bench_repeats rounds, the paths taking
    turns in each (so a load that comes and goes falls on all of them)."""
    paths = {"in the loop": in_loop(cfg, params, tok, rows, batch_rows)}
    if _HARNESS.value and tok.name == "gpt2":
        paths |= through_harness(cfg, params, tok, rows, batch_rows)
    first = {path: call() for path, call in paths.items()}
    rounds = [{p: call() for p, call in paths.items()} for _ in range(_REPEATS.value)]
    scores = {round(r[2], 9) for r in first.values()}
    assert len(scores) == 1, f"the paths score differently: {first}"
    E, n = len(rows), 4 * len(rows)
    T = max(
        len(w[0]) for ex in hellaswag.windows(rows, tok, cfg.block_size) for w in ex
    )
    for path in paths:
        total = [r[path][0] for r in rounds]
        median = float(np.median(total))
        model_s = float(np.median([r[path][1] for r in rounds]))
        harness_s = float(np.median([r[path][0] - r[path][1] for r in rounds]))
        print(
            f"| {name} | {model.count_params(params) / 1e6:.1f}M | {path} | {E} | {T} |"
            f" {first[path][0]:.1f} | {median:.2f} ({min(total):.2f}) |"
            f" {E / median:,.1f} | {1000 * median / n:.2f} | {1000 * model_s / n:.2f} |"
            f" {1000 * harness_s / n:.2f} |",
            flush=True,
        )


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
    lscpu = lscpu.stdout
    names = [
        line.split(":", 1)[1].strip()
        for line in lscpu.splitlines()
        if "Model name" in line
    ]
    return f"{names[0] if names else 'unknown CPU'}, {jax.devices()[0].device_kind}"


def main(argv):
    del argv
    cpu_speedups()
    eval_cfg = cli.from_flags(EvalConfig)
    path = eval_cfg.eval_data_path
    rows = hellaswag.read_examples(path) if path else synthetic_rows(_EXAMPLES.value)
    rows = rows[: _EXAMPLES.value]
    B = eval_cfg.eval_batch_size
    print(
        f"{machine()}; jax {jax.__version__}; {len(rows)} HellaSwag examples"
        f" ({'from ' + path if path else 'synthetic'}), {B} rows per call"
    )
    print(
        "\n| model | params | path | examples | T | first run (s) |"
        " warm run (s): median (best) | examples/s | s per 1,000 requests |"
        " of which the model's calls | and the harness's own |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in _MODELS.value:
        bench(name, *model_and_tokenizer(name), rows, B)


if __name__ == "__main__":
    app.run(main)
