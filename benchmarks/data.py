"""Batches from memory-mapped token files: microseconds per batch, and memory.

  python benchmarks/data.py                       # a 4 GB token file in /tmp
  python benchmarks/data.py --gigabytes=8 --path=/data/big.bin

Writes a file of random uint16 token ids (once; reused when it exists), then
times what the training loop does per step on the host: draw the batch's
window starts from the batch stream at that step and read the windows
(data.get_batch on an np.memmap), for B=64, T=256 and B=12, T=1024. Peak
resident memory is read for a process that opens the file and draws 2,000
batches, once for the whole file and once for its first 1%: it must not grow
with the file's size (only the windows read are paged in).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxgpt import data, streams

SHAPES = [(64, 256), (12, 1024)]


def make_file(path: Path, n_bytes: int) -> None:
    if path.is_file() and path.stat().st_size == n_bytes:
        return
    rng = np.random.default_rng(0)
    chunk = 2**26  # Tokens per write.
    with open(path.with_suffix(".tmp"), "wb") as f:
        for start in range(0, n_bytes // 2, chunk):
            n = min(chunk, n_bytes // 2 - start)
            rng.integers(0, 50257, n, dtype=np.uint16).tofile(f)
    os.replace(path.with_suffix(".tmp"), path)


def time_batches(tokens: np.ndarray, B: int, T: int, n: int = 2000) -> list[float]:
    stream = np.asarray(streams.stream(streams.root(0), "batch"))
    times = []
    for step in range(n):
        t0 = time.perf_counter()
        data.get_batch(tokens, streams.host_rng(stream, step), B, T)
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mb(path: Path, fraction: float) -> float:
    """Peak RSS of a fresh process that draws 2,000 batches of 64 x 256 from
    the first `fraction` of the file."""
    code = (
        "import resource, numpy as np, sys\n"
        "from jaxgpt import data, streams\n"
        f"t = np.memmap({str(path)!r}, dtype=np.uint16, mode='r')\n"
        f"t = t[: int(len(t) * {fraction})]\n"
        "s = np.asarray(streams.stream(streams.root(0), 'batch'))\n"
        "for i in range(2000): data.get_batch(t, streams.host_rng(s, i), 64, 256)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=4.0)
    p.add_argument("--path", default="/tmp/jaxgpt_bench_tokens.bin")
    args = p.parse_args()
    path = Path(args.path)
    t0 = time.perf_counter()
    make_file(path, int(args.gigabytes * 2**30))
    print(
        f"{path}: {path.stat().st_size / 2**30:.1f} GiB ({time.perf_counter() - t0:.0f} s to write)"
    )
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    for B, T in SHAPES:
        times = time_batches(tokens, B, T)
        print(
            f"B={B:3d} T={T:4d}: median {1e6 * statistics.median(times):7.1f} us/batch,"
            f" p99 {1e6 * np.percentile(times, 99):7.1f} us (2,000 batches)"
        )
    for fraction in (1.0, 0.01):
        print(
            f"peak RSS, {fraction:.0%} of the file: {peak_rss_mb(path, fraction):.0f} MB"
        )
    print(
        f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB peak RSS"
    )


if __name__ == "__main__":
    main()
