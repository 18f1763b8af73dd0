"""Batches from memory-mapped token files: microseconds per batch, and memory.

  python benchmarks/data.py                        # a 4 GiB token file under /tmp
  python benchmarks/data.py --gigabytes=8 --dir=/data/bench

Writes a dataset folder of random uint16 token ids (once; reused when it
exists) with a character tokenizer, then:
- times what the training loop does per step on the host: draw the batch's
  window starts from the batch stream at that step and read the windows (a
  second pass over the same 2,000 batches, so the page cache is warm)
  (data.get_batch on a token_file.TokenFile, and for comparison on an np.memmap),
  for B=64, T=256 and B=12, T=1024;
- runs the training program itself (`python -m jaxgpt.main`, a small model,
  200 steps) on that dataset and on a copy holding its first 1%, and reports
  each process's peak resident memory: it must not grow with the file's size.
  A first run fills the compilation caches, so that the measured runs load
  their programs alike; each is run three times, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxgpt import data, train
from jaxgpt.datasets import token_file

SHAPES = [(64, 256), (12, 1024)]
VOCAB = "".join(chr(c) for c in range(33, 33 + 65))  # 65 printable characters.


def make_dataset(folder: Path, n_tokens: int) -> None:
    """<folder>/{train,val}.bin of random ids below 65, and its meta.json."""
    meta_path = folder / "meta.json"
    if (
        meta_path.is_file()
        and json.loads(meta_path.read_text())["train_tokens"] == n_tokens
    ):
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng, chunk = np.random.default_rng(0), 2**26
    with open(folder / "train.bin", "wb") as f:
        for start in range(0, n_tokens, chunk):
            rng.integers(0, 65, min(chunk, n_tokens - start), dtype=np.uint16).tofile(f)
    rng.integers(0, 65, 2**20, dtype=np.uint16).tofile(folder / "val.bin")
    meta = {
        "dataset": folder.name,
        "tokenizer": {"name": "char", "vocab": VOCAB},
        "dtype": "uint16",
        "train_tokens": n_tokens,
        "val_tokens": 2**20,
    }
    meta_path.write_text(json.dumps(meta))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return (
            next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        )


def time_batches(tokens: np.ndarray, B: int, T: int, n: int = 2000) -> list[float]:
    stream = np.asarray(train.stream(train.root_key(0), "batch"))
    times = []
    for step in range(n):
        t0 = time.perf_counter()
        data.get_batch(tokens, train.host_rng(stream, step), B, T)
        times.append(time.perf_counter() - t0)
    return times


def train_peak_rss_mb(data_dir: Path, dataset: str, workdir: Path) -> tuple[float, str]:
    """Peak RSS (MB) of `python -m jaxgpt.main` training 200 steps on `dataset`."""
    shutil.rmtree(workdir, ignore_errors=True)
    flags = [
        f"--data_dir={data_dir}", f"--dataset={dataset}", f"--workdir={workdir}",
        "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=256",
        "--batch_size=16", "--max_iters=200", "--eval_interval=200", "--eval_iters=5",
        "--log_interval=100", "--max_new_tokens=10", "--prompt=A",
    ]  # fmt: skip
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "jaxgpt.main", *flags],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    speed = re.findall(r"step 200: loss [\d.]+, .*?([\d.]+ ms/step)", done.stderr)
    return int(rss.group(1)) / 1024, speed[-1] if speed else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=4.0, help="Size of train.bin.")
    p.add_argument("--dir", default="/tmp/jaxgpt_bench_data", help="Its data_dir.")
    args = p.parse_args()
    data_dir, n = Path(args.dir), int(args.gigabytes * 2**30) // 2
    t0 = time.perf_counter()
    make_dataset(data_dir / "big", n)
    make_dataset(data_dir / "small", n // 100)
    big = data_dir / "big" / "train.bin"
    print(f"{big}: {big.stat().st_size / 2**30:.2f} GiB, {n:,} tokens")
    print(f"(written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} cores)")
    readers = {
        "TokenFile": token_file.TokenFile(big, np.uint16),
        "np.memmap": np.memmap(big, dtype=np.uint16, mode="r"),
    }
    for B, T in SHAPES:
        for name, tokens in readers.items():
            time_batches(tokens, B, T)  # The same windows again: page cache warm.
            times = time_batches(tokens, B, T)
            print(
                f"B={B:3d} T={T:4d} {name:>9}: median"
                f" {1e6 * statistics.median(times):6.1f} us/batch,"
                f" p99 {1e6 * np.percentile(times, 99):7.1f} us (2,000 batches)"
            )
    print(f"this process's RSS after them: {rss_mb():.0f} MB (the memmap's pages)")
    train_peak_rss_mb(data_dir, "small", data_dir / "run_warm")  # Fills the caches.
    runs = {"big": [], "small": []}
    for _ in range(3):  # Alternating: XLA's own memory varies from run to run.
        for name, results in runs.items():
            results.append(train_peak_rss_mb(data_dir, name, data_dir / f"run_{name}"))
    for name, results in runs.items():
        size = (data_dir / name / "train.bin").stat().st_size / 2**20
        rss = sorted(r for r, _ in results)
        print(
            f"training on {size:8,.0f} MiB of tokens: peak RSS {rss[0]:.0f}-{rss[-1]:.0f}"
            f" MB over 3 runs ({results[-1][1]})"
        )


if __name__ == "__main__":
    main()
