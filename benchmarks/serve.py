"""Serving speed: tokens/s, time to first token and memory at 1, 4 and 16 streams.

  python benchmarks/serve.py                                   # the baby GPT's and GPT-2 124M's shapes
  python benchmarks/serve.py --bench_models=gpt2 --bench_streams=1,16
  python benchmarks/serve.py --bench_parts=engine,decoder      # no HTTP, no PyTorch
  python benchmarks/serve.py --bench_models=cpu --bench_prompt_tokens=16,24 --bench_new_tokens=32

Each model has random weights in a shape: "shakespeare" (experiments/shakespeare.cfg's
baby GPT over tiny shakespeare's 65 characters), "gpt2" (experiments/gpt2_124m.cfg's
shape over GPT-2's 50,257 tokens, float32), "cpu" (experiments/shakespeare_cpu.cfg's:
a context of 64, so pass e.g. --bench_prompt_tokens=16,24 --bench_new_tokens=32),
"tiny" (1 layer, 16 wide: the smoke run). It is written once as a Hugging Face folder (hub.load.write_model), and
every part reads that folder and answers the same requests: each a chat request
(a base model: plain continuation of the message) with a prompt of
--bench_prompt_tokens, --bench_new_tokens new tokens drawn at temperature 1 from
every token (top_k 0, top_p 1; stop ids only end a reply early, the counts say
so), seed k for request k. At c streams, c clients each send --bench_rounds
requests one after the other. The parts, each in a process of its own:

  server       python -m jaxgpt.serve --init_from=<folder> --slots=--bench_slots,
               its clients in threads here, streaming over HTTP (server-sent events)
  engine       jaxgpt.chat.engine.Engine (--bench_slots rows) in-process, clients in threads
  decoder      run/decoding.decode on the same prompts, c rows (no threads, no text)
  transformers AutoModelForCausalLM.from_pretrained(<folder>).generate, one request
               at a time (torch CPU, --bench_torch_threads), min_new_tokens =
               max_new_tokens; its requests: the first --bench_hf_requests

tokens/s: tokens drawn by every request / wall time from the first request sent
to the last reply's end; time to first token (TTFT): from a request sent to its
first text (transformers: its first new token, queueing not counted); peak RSS:
the part's process (the server's, not its clients'), reset before each level
(/proc/<pid>/clear_refs); load: the machine's load average over the minute
before the level ended (other work on its CPUs slows every part). Warm: one
request per compiled prompt length is sent before timing (the decoder: the
level's own prompts, which compile its prefills of several rows). Printed: a table per
model, then the goals at the most streams (the server's tokens/s against
transformers' one request at a time, and against its own single stream);
--bench_out writes every figure as JSON.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from jaxgpt.run import cli  # Its flags: a part loads its model as the server does.

REPO = Path(__file__).resolve().parents[1]
PARTS = ("server", "engine", "decoder", "transformers")
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
WORDS = [  # Prompts are drawn from these.
    "the", "king", "shall", "come", "to", "york", "and", "speak", "of", "war", "and",
    "peace", "while", "all", "the", "lords", "of", "england", "wait", "upon", "his",
    "word", "my", "gracious", "lady", "hear", "me", "now", "for", "i", "have", "seen",
    "the", "morning", "break", "above", "the", "hills", "and", "every", "man", "that",
    "loves", "his", "country", "stands", "beside", "me", "here", "tonight",
]  # fmt: skip

_MODELS = flags.DEFINE_list(
    "bench_models", ["shakespeare", "gpt2"], "Shapes: shakespeare, gpt2, cpu, tiny."
)
_STREAMS = flags.DEFINE_list("bench_streams", ["1", "4", "16"], "Concurrent streams.")
_PARTS = flags.DEFINE_list("bench_parts", list(PARTS), "What to time.")
_NEW = flags.DEFINE_integer("bench_new_tokens", 64, "New tokens per request.")
_PROMPT = flags.DEFINE_list(
    "bench_prompt_tokens", ["32", "64"], "Prompt lengths: the least and the most."
)
_ROUNDS = flags.DEFINE_integer("bench_rounds", 2, "Requests per stream.")
_SLOTS = flags.DEFINE_integer("bench_slots", 16, "The server's and engine's rows.")
_HF_REQUESTS = flags.DEFINE_integer(
    "bench_hf_requests", 8, "Requests transformers answers, one at a time."
)
_TORCH_THREADS = flags.DEFINE_integer("bench_torch_threads", 2, "torch's threads.")
_OUT = flags.DEFINE_string("bench_out", "", "Also write every figure here (JSON).")
_ISOLATE = flags.DEFINE_bool(
    "bench_isolate", True, "Each part in a process of its own (no: in this one,"
    " its peak RSS then this process's)."
)  # fmt: skip
# A part's own process (internal).
_PART = flags.DEFINE_string("bench_part", "", "Run one part (internal).")
_FOLDER = flags.DEFINE_string("bench_folder", "", "The model's folder (internal).")


# --- the model and the requests -------------------------------------------------


def shape(model: str) -> tuple[dict, str]:
    """(ModelConfig fields, tokenizer kind) of a named shape."""
    if model == "tiny":
        return {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 128}, "chars"
    cfg = {
        "cpu": "shakespeare_cpu.cfg",
        "shakespeare": "shakespeare.cfg",
        "gpt2": "gpt2_124m.cfg",
    }[model]
    text = (REPO / "experiments" / cfg).read_text()
    fields = {
        k: int(v)
        for k, v in re.findall(
            r"^--(n_layer|n_head|n_embd|block_size)=(\d+)", text, re.MULTILINE
        )
    }
    fields["bias"] = "--nobias" not in text
    return fields, "gpt2" if model == "gpt2" else "chars"


def write_folder(model: str, folder: str) -> str:
    """The model, random weights, as a Hugging Face folder; a line describing it."""
    import jax

    from jaxgpt import lecture, tokenizer
    from jaxgpt import model as gpt
    from jaxgpt.config import ModelConfig
    from jaxgpt.hub import hf, load, tokenizer_io

    fields, kind = shape(model)
    tok = (
        tokenizer.CharTokenizer(SHAKESPEARE_CHARS)
        if kind == "chars"
        else tokenizer_io.load_gpt2(allow_download=False)
    )
    cfg = ModelConfig(vocab_size=tok.vocab_size, dropout=0.0, **fields)
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    files, _ = hf.tokenizer_files(tok)
    load.write_model("gpt2", params, cfg, folder, files)
    return (
        f"{model}: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} T={cfg.block_size}"
        f" V={cfg.vocab_size} ({gpt.count_params(params) / 1e6:.1f}M params),"
        f" float32, random weights"
    )


def load_chat_model(folder: str):
    """The folder's model as `python -m jaxgpt.serve --init_from` loads it."""
    from jaxgpt.chat import model as chat_model

    cli.FLAGS.init_from = folder
    return chat_model.load(cli.command())


def make_requests(chat, n: int) -> list[dict]:
    """n requests: messages whose prompts take between the least and the most
    of --bench_prompt_tokens, their prompt ids, and their seeds."""
    low, high = map(int, _PROMPT.value)
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        want, words = int(rng.integers(low, high + 1)), []
        while True:  # Words until the prompt is as long as wanted.
            words.append(WORDS[int(rng.integers(len(WORDS)))])
            messages = [{"role": "user", "content": " ".join(words)}]
            ids, _ = chat.chat_prompt(messages, _NEW.value)
            if len(ids) >= want:
                break
        out.append({"messages": messages, "ids": [int(i) for i in ids], "seed": k})
    return out


# --- timing ---------------------------------------------------------------------


def peak_rss_mib(pid: int | str = "self") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def reset_peak_rss(pid: int | str = "self") -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:  # Not Linux, or not allowed: the peak since the start.
        pass


def summary(records: list[tuple[float, float, int]], wall: float) -> dict:
    """records: (sent, first text, tokens) per request, times from the start."""
    ttft = sorted(first - sent for sent, first, _ in records)
    tokens = sum(n for *_, n in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "load": os.getloadavg()[0],
    }


def in_streams(requests: list[dict], streams: int, send) -> dict:
    """`streams` threads, each sending its share of `requests` one after the
    other through send(request) -> (time of first text, tokens)."""
    records: list = []
    start = time.perf_counter()

    def client(share):
        for r in share:
            sent = time.perf_counter()
            first, tokens = send(r)
            records.append((sent, first, tokens))

    threads = [
        threading.Thread(target=client, args=(requests[i::streams],))
        for i in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(records, time.perf_counter() - start)


def warm_requests(requests: list[dict]) -> list[dict]:
    """One request per compiled prompt length (decoding.padded_length)."""
    from jaxgpt.run.decoding import padded_length

    seen = {}
    for r in requests:
        seen.setdefault(padded_length(len(r["ids"]), 1 << 30), r)
    return list(seen.values())


# --- the parts ------------------------------------------------------------------


def run_engine(folder: str, levels: dict[int, list[dict]]) -> dict:
    from jaxgpt.chat.engine import Engine
    from jaxgpt.run.decoding import RowOptions

    engine = Engine(load_chat_model(folder), slots=_SLOTS.value)

    def send(r):
        opts = RowOptions(_NEW.value, 1.0, 1.0, 0, r["seed"])
        request, first = engine.submit(r["ids"], opts), None
        for _ in request:
            first = first or time.perf_counter()
        return first or time.perf_counter(), request.completion_tokens

    for r in warm_requests(levels[max(levels)]):
        send(r)
    out = {}
    for c, requests in levels.items():
        reset_peak_rss()
        out[c] = {**in_streams(requests, c, send), "peak_rss_mib": peak_rss_mib()}
    engine.close()
    return out


def run_decoder(folder: str, levels: dict[int, list[dict]]) -> dict:
    from jaxgpt.run.decoding import RowOptions, decode

    chat = load_chat_model(folder)

    def run(requests, rows):
        opts = [RowOptions(_NEW.value, 1.0, 1.0, 0, r["seed"]) for r in requests]
        prompts = [r["ids"] for r in requests]
        start = time.perf_counter()
        out = decode(
            chat.apply_fn, chat.params, chat.model_cfg, prompts, opts, rows=rows
        )
        wall = time.perf_counter() - start
        tokens = sum(map(len, out))
        return {"requests": len(requests), "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "load": os.getloadavg()[0]}  # fmt: skip

    out = {}
    for c, requests in levels.items():
        run(requests, c)  # Compiles this level's step and prefills (rows per length).
        reset_peak_rss()
        out[c] = {**run(requests, c), "peak_rss_mib": peak_rss_mib()}
    return out


def run_transformers(folder: str, levels: dict[int, list[dict]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(_TORCH_THREADS.value)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    N = _NEW.value

    class FirstToken:  # generate()'s streamer: put() gets the prompt, then each token.
        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    def send(r):
        torch.manual_seed(r["seed"])
        streamer = FirstToken()
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([r["ids"]]), attention_mask=torch.ones(1, len(r["ids"]), dtype=torch.long),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                min_new_tokens=N, pad_token_id=0, streamer=streamer,
            )  # fmt: skip
        return streamer.first, out.shape[1] - len(r["ids"])

    requests = levels[max(levels)][: _HF_REQUESTS.value]
    for r in warm_requests(requests):
        send(r)
    reset_peak_rss()
    return {1: {**in_streams(requests, 1, send), "peak_rss_mib": peak_rss_mib(),
                "torch_threads": torch.get_num_threads()}}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_chat(port: int, r: dict) -> tuple[float, int]:
    """One streamed chat request: (time of its first text, tokens drawn)."""
    body = json.dumps({
        "model": "bench", "messages": r["messages"], "max_tokens": _NEW.value,
        "temperature": 1.0, "top_p": 1.0, "seed": r["seed"], "stream": True,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(
        "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(
            f"the server answered {response.status}: {response.read()!r}"
        )
    first, usage = None, None
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
            first = time.perf_counter()
        usage = chunk.get("usage") or usage
    conn.close()
    if usage["prompt_tokens"] != len(r["ids"]):
        raise RuntimeError(
            f"the server's prompt has {usage['prompt_tokens']} tokens, this"
            f" script's {len(r['ids'])}: the parts would not answer the same requests."
        )
    return first or time.perf_counter(), usage["completion_tokens"]


def run_server(folder: str, levels: dict[int, list[dict]]) -> dict:
    """The server as a user starts it, its clients in this process's threads."""
    port = free_port()
    command = [
        sys.executable, "-m", "jaxgpt.serve", f"--init_from={folder}",
        f"--slots={_SLOTS.value}", f"--port={port}", "--top_k=0", "--model_name=bench",
    ]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally)
    server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(
                    f"the server did not start:\n{log.read().decode()[-3000:]}"
                )
            time.sleep(0.2)
        for r in warm_requests(levels[max(levels)]):
            stream_chat(port, r)
        out = {}
        for c, requests in levels.items():
            reset_peak_rss(server.pid)
            result = in_streams(requests, c, lambda r: stream_chat(port, r))
            out[c] = {**result, "peak_rss_mib": peak_rss_mib(server.pid)}
        return out
    finally:
        server.terminate()
        server.wait(30)
        log.close()


RUNNERS = {"server": run_server, "engine": run_engine, "decoder": run_decoder,
           "transformers": run_transformers}  # fmt: skip


def part_main() -> None:
    """A part in this process: the requests on stdin, its figures on stdout."""
    from jaxgpt.run.perf import cpu_speedups

    cpu_speedups()  # As the server's command does.
    levels = {int(c): rs for c, rs in json.load(sys.stdin).items()}
    result = RUNNERS[_PART.value](_FOLDER.value, levels)
    print("RESULT " + json.dumps(result), flush=True)


def run_part(part: str, folder: str, levels: dict[int, list[dict]]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, f"--bench_part={part}", f"--bench_folder={folder}",
         *(a for a in sys.argv[1:] if not a.startswith("--bench_part"))],
        input=json.dumps(levels), capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    found = re.search(r"^RESULT (.*)$", done.stdout, re.MULTILINE)
    if done.returncode or not found:
        raise RuntimeError(f"{part} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return {int(c): v for c, v in json.loads(found.group(1)).items()}


# --- the report -----------------------------------------------------------------


def cpu_name() -> str:
    try:
        out = subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True
        ).stdout
        return re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        return "unknown CPU"


def table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| streams | part | requests | tokens/s | TTFT median (s) | TTFT p90 (s) |"
        + " peak RSS (MiB) | load |",
        "|--:|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for c in sorted({c for r in results.values() for c in r}):
        for part in PARTS:
            if (f := results.get(part, {}).get(c)) is None:
                continue
            ttft = (
                f"{f['ttft_median_s']:.3f} | {f['ttft_p90_s']:.3f}"
                if "ttft_median_s" in f else "- | -"
            )  # fmt: skip
            name = {"transformers": "transformers, one at a time"}.get(part, part)
            lines.append(
                f"| {c} | {name} | {f['requests']} | {f['tokens_per_s']:.1f} |"
                f" {ttft} | {f['peak_rss_mib']:.0f} | {f['load']:.1f} |"
            )
    return lines


def goals(results: dict[str, dict]) -> list[str]:
    server, hf = results.get("server", {}), results.get("transformers", {})
    top = max(server, default=None)
    lines = []
    if top is not None and hf:
        x = server[top]["tokens_per_s"] / hf[1]["tokens_per_s"]
        met = "met" if x >= 5 else "missed"
        lines.append(f"goal: server at {top} streams / transformers one at a time:"
                     f" {x:.2f}x (>= 5x: {met})")  # fmt: skip
    if top is not None and 1 in server and top > 1:
        x = server[top]["tokens_per_s"] / server[1]["tokens_per_s"]
        met = "met" if x >= 4 else "missed"
        lines.append(f"goal: server at {top} streams / its own single stream:"
                     f" {x:.2f}x (>= 4x: {met})")  # fmt: skip
    return lines


def main(argv):
    del argv
    if _PART.value:
        return part_main()
    unknown = sorted(set(_PARTS.value) - set(PARTS))
    if unknown:
        sys.exit(
            f"error: --bench_parts names {', '.join(unknown)}: choose from {', '.join(PARTS)}."
        )
    streams = sorted(map(int, _STREAMS.value))
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs (load average {load:.1f} at the start);"
          f" {_NEW.value} new tokens per request, prompts of {'-'.join(_PROMPT.value)}"
          f" tokens, {_ROUNDS.value} requests per stream, {_SLOTS.value} slots",
          flush=True)  # fmt: skip
    report = {}
    for model in _MODELS.value:
        with tempfile.TemporaryDirectory() as folder:
            print(write_folder(model, folder), flush=True)
            chat = load_chat_model(folder)
            requests = make_requests(chat, max(streams) * _ROUNDS.value)
            levels = {c: requests[: c * _ROUNDS.value] for c in streams}
            results = {}
            for part in [p for p in PARTS if p in _PARTS.value]:
                if _ISOLATE.value:
                    results[part] = run_part(part, folder, levels)
                else:
                    results[part] = RUNNERS[part](folder, levels)
                print(f"  {part}: done", flush=True)
            for line in [*table(results), *goals(results)]:
                print(line, flush=True)
            report[model] = results
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
