"""Model FLOP utilisation (MFU): the hardware's peak FLOP/s, known or measured.

The one definition, used by the training log and the benchmarks alike:
MFU = (model FLOPs per token x tokens/s) / (peak FLOP/s of one device x
devices), with the model FLOPs per token from `flops_per_token` (6N + 12LCT)
and the peak from `peak_flops`: --peak_tflops when given; the data sheet's
figure for a known accelerator and the compute dtype; else (a CPU) the
fastest of many short jitted matmuls in that dtype. A matmul's measured
FLOP/s can only fall short of the peak (another process takes cores), never
exceed it, so the best ever seen is kept per machine (`stored_peak`, in
cache.peak_file()) and measured again when it is older than PEAK_MAX_AGE_DAYS
or was measured under load and the machine is quiet now: the denominator
does not freeze a busy moment, and it is the same for every run between.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig
from jaxgpt.lecture import init_params
from jaxgpt.model import count_params
from jaxgpt.run import workdir

# Dense peak TFLOP/s per chip from the vendors' data sheets, by compute dtype.
KNOWN_PEAKS = {
    "a100": {"bfloat16": 312.0, "float32": 19.5},
    "h100": {"bfloat16": 989.0, "float32": 67.0},
    "h200": {"bfloat16": 989.0, "float32": 67.0},
    "tpu v2": {"bfloat16": 45.0},
    "tpu v3": {"bfloat16": 123.0},
    "tpu v4": {"bfloat16": 275.0},
    "tpu v5 lite": {"bfloat16": 197.0},  # v5e's device_kind.
    "tpu v5e": {"bfloat16": 197.0},
    "tpu v5p": {"bfloat16": 459.0},
    "tpu v6 lite": {"bfloat16": 918.0},  # v6e (Trillium)'s device_kind.
    "tpu v6e": {"bfloat16": 918.0},
}


def known_peak(device_kind: str, dtype: str) -> float | None:
    """Data-sheet peak FLOP/s of one chip for `dtype`, or None if not in the table."""
    kind = device_kind.lower()
    for name, peaks in KNOWN_PEAKS.items():
        if name in kind and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


# GPUs before Ampere have no bfloat16 units (Colab's T4 among them).
NO_BFLOAT16_GPUS = ("t4", "v100", "p100", "p4", "k80")


def round_batch(batch_size: int, devices: int) -> int:
    """batch_size rounded up to a multiple of `devices`, so that it splits over them."""
    return devices * -(-batch_size // devices)


def compute_dtype(backend: str, device_kind: str) -> str:
    """The dtype to compute in on these devices: bfloat16 on a TPU and on a GPU
    from Ampere on, float32 on a CPU (bfloat16 is slow there) and on older GPUs."""
    old_gpu = backend == "gpu" and any(
        name in device_kind.lower() for name in NO_BFLOAT16_GPUS
    )
    return "float32" if backend == "cpu" or old_gpu else "bfloat16"


def measure_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` jitted n x n x n matmuls on one device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name with its family and model numbers (lscpu's name alone,
    "AMD EPYC", covers generations 2-3x apart), else the platform's word."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        cpuinfo = ""
    info = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name or "unknown CPU"


def machine_key(dtype: str) -> str:
    """What a stored peak belongs to: the processor, the cores this process may
    use, the device, the dtype and the JAX version (a new XLA may be faster)."""
    cpu = cpu_name()
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    device = jax.devices()[0].device_kind
    return f"{cpu} | {cores} cores | {device} | {dtype} | jax {jax.__version__}"


# A stored peak is measured again after this many days, or when it was measured
# with more than LOADED runnable processes per core and the machine is quiet now
# (at most LOADED), or half as busy.
PEAK_MAX_AGE_DAYS = 7
LOADED = 0.5


def load_per_core() -> float | None:
    """The 1-minute load average per core (None where the OS has none)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def stale(entry: dict, n: int, now: float, load: float | None) -> str | None:
    """Why a stored peak must be measured again (None: it stands)."""
    if entry.get("n") != n or "measured_at" not in entry:
        return "none stored for this matmul"
    days = (now - entry["measured_at"]) / 86400
    if days > PEAK_MAX_AGE_DAYS:
        return f"the stored one is {days:.0f} days old"
    then = entry.get("load_per_core")
    loaded_then = then is not None and then > LOADED
    if loaded_then and load is not None and load <= max(LOADED, then / 2):
        return f"the stored one was measured under load ({then:.2f} per core)"
    return None


def stored_peak(
    dtype: str, path: Path, n: int = 2048, trials: int = 5, force: bool = False
) -> tuple[float, str]:
    """This machine's peak for `dtype`: the best FLOP/s ever measured here,
    stored in `path`, measured again (the best of `trials` measure_peak()s) when
    there is none, it is `stale`, or with `force`. Returns (peak, how)."""
    path, key = Path(path), machine_key(dtype)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(key) if isinstance(table.get(key), dict) else {}
    now, load = time.time(), load_per_core()
    why = "measured again (--measure_peak)" if force else stale(entry, n, now, load)
    if why is None:
        return float(entry["flops"]), f"stored in {path}, {when(entry)}"
    runs = [measure_peak(dtype, n, repeats=3) for _ in range(trials)]
    best_before = float(entry["flops"]) if entry.get("n") == n else 0.0
    entry = {
        "flops": max([best_before, *runs]),
        "n": n,
        "measured_at": now,
        "load_per_core": load,
        "runs": runs,
    }
    table[key] = entry
    try:  # Atomic: a concurrent run reads old or new, whole.
        workdir.write_atomically(path, json.dumps(table, indent=1))
    except OSError:
        pass  # Unwritable cache: measured again next time.
    kept = "" if max(runs) >= best_before else f", {best_before / 1e9:.4g} kept"
    return entry["flops"], (
        f"{why}: best {max(runs) / 1e9:.4g}{kept}; stored in {path}"
    )


def when(entry: dict) -> str:
    """When and under what load a stored peak was measured, in a few words."""
    date = datetime.datetime.fromtimestamp(entry["measured_at"]).strftime("%Y-%m-%d")
    load = entry.get("load_per_core")
    return f"measured {date}" + ("" if load is None else f" at load {load:.2f}/core")


def peak_flops(
    dtype: str = "float32",
    tflops: float | None = None,
    n: int = 2048,
    measure: bool = False,
    store: Path | None = None,
) -> tuple[float, str]:
    """Peak FLOP/s of one device and where it came from: given (`tflops`), the
    data sheet, the best measured on this machine (kept in `store`, see
    stored_peak), or measured now (no `store`). `measure` measures even a
    known device, or a stored peak again."""
    if tflops and not measure:
        return tflops * 1e12, "given"
    kind = jax.devices()[0].device_kind
    peak = None if measure else known_peak(kind, dtype)
    if peak is not None:
        return peak, f"{kind} data sheet, {dtype}"
    what = f"{n}^3 {jnp.dtype(dtype).name} matmul"
    if store is None:
        return measure_peak(dtype, n), f"measured now: {what}"
    peak, how = stored_peak(dtype, store, n, force=measure)
    return peak, f"measured: the best {what} on this machine, {how}"


def matmul_params(config: ModelConfig) -> int:
    """N of 6N: the parameters of the matmuls a token passes through (see
    flops_per_token)."""
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    lookups = [params.get("wpe", {}), {} if config.tie_embeddings else params["wte"]]
    return count_params(params) - count_params(lookups)


@functools.lru_cache(maxsize=32)
def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token, 6N + 12*L*C*T, counted from the parameter tree.

    N: the parameters of the matmuls a token passes through, i.e. all but the
    tables it only looks up: the position table (absent with rope) and, with
    an untied output layer, the token embedding (tied, it counts once, as the
    output layer), as nanoGPT's estimate_mfu counts them; 6N is their forward
    (2N) and backward (4N) FLOPs. So grouped-query attention's smaller key
    and value projections, SwiGLU's third matrix and an untied lm_head enter
    through N. 12LCT: the attention scores and values, H query heads of D =
    C / H channels against T keys (K < H key/value heads do not change it).
    Norms, activations, RoPE and the soft-cap are elementwise and not counted.
    Tests check the total against XLA's count of the compiled gradient.
    """
    if not config.kind.gpt:  # The bigram, and the lecture's steps: not counted.
        return 0.0
    n = matmul_params(config)
    C, L, T = config.n_embd, config.n_layer, config.block_size
    return 6.0 * n + 12.0 * L * C * T


def mfu(flops_per_token: float, tokens_per_s: float, peak: float, devices: int = 1):
    """Fraction of the devices' peak that the model's FLOPs achieve."""
    return flops_per_token * tokens_per_s / (peak * devices)


# --- The allocator -----------------------------------------------------------

# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
    """Tells glibc malloc to reuse freed memory instead of returning it to the OS,
    so XLA's steps on a CPU stop page-faulting (CPU recipe 59.3 -> 42.7 ms/step
    on a 2-core AMD EPYC).

    One arena (so XLA's threads share the reuse), no mmap'd allocations, and no
    trimming of the heap. Call before XLA allocates. A no-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {
        M_ARENA_MAX: 1,
        M_MMAP_MAX: 0,
        M_TRIM_THRESHOLD: -1,  # glibc reads -1 as SIZE_MAX: never trim.
        M_TOP_PAD: 256 * 2**20,
    }
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def cpu_speedups() -> None:
    """What main.py applies before XLA starts (the benchmarks too, to time what
    a run gets): keep_freed_memory and unroll_threefry."""
    keep_freed_memory()
    unroll_threefry()


def unroll_threefry() -> bool:
    """Compiles JAX's Threefry hash (dropout masks, fold_in, sampling) with its 20
    rounds unrolled on a CPU too, as JAX does on GPU and TPU: the same bits, but
    XLA fuses the rounds into one pass over the elements, where the CPU's
    default, a rolled loop of 5 steps, writes the whole state to memory at each
    (the baby GPT, dropout 0.2: 9.52 -> 8.40 s/step on a 2-core AMD EPYC; the
    first compile takes about 1.4 s longer).

    JAX's own unrolled lowering, registered for the CPU: a private JAX API, so a
    no-op (False) wherever it has moved. Call before the first compilation.
    """
    try:
        from jax.interpreters import mlir

        threefry = jax_threefry()
        rule = threefry._threefry2x32_lowering_rule
        mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")
    except (ImportError, AttributeError):
        return False
    return True


def jax_threefry():
    """JAX's private module of the Threefry primitive and its lowerings."""
    try:
        from jax._src.random import threefry2x32  # JAX 0.10 (checked).
    except ImportError:
        from jax._src import prng as threefry2x32  # JAX 0.6 (checked).
    return threefry2x32
