"""What a run keeps for the next one, in the user's cache directory.

$XDG_CACHE_HOME/jaxgpt (else ~/.cache/jaxgpt):

    tinyshakespeare/  the corpus, downloaded once (prepare.find_corpus).
    xla/        JAX's persistent compilation cache: every compiled program
                (train step, evaluation, sampling), keyed by its HLO, the
                compile options and the JAX/XLA version, so a second run of
                the same recipe loads them instead of compiling (seconds on a
                CPU), and a changed program compiles anew.
    peak.json   this machine's peak FLOP/s, measured once (perf.stored_peak).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/jaxgpt, else ~/.cache/jaxgpt."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxgpt"


def compilation_cache_dir() -> Path:
    return cache_dir() / "xla"


def peak_file() -> Path:
    return cache_dir() / "peak.json"


def enable_compilation_cache() -> Path:
    """Keeps every compiled program in compilation_cache_dir() and loads it from
    there when the same program is compiled again.

    Call before the first compilation. Programs of any size or compile time
    are kept: on a CPU even the small ones take a noticeable part of start-up.
    A directory already set (JAX_COMPILATION_CACHE_DIR) is kept.
    """
    import jax  # Here only: preparing a dataset reads cache_dir() without JAX.

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
