"""What a run keeps for the next one, in the user's cache directory.

$XDG_CACHE_HOME/jaxgpt (else ~/.cache/jaxgpt), beside the downloaded corpus:

    xla/        JAX's persistent compilation cache: every compiled program
                (train step, evaluation, sampling), keyed by its HLO, the
                compile options and the JAX/XLA version, so a second run of
                the same recipe loads them instead of compiling (seconds on a
                CPU), and a changed program compiles anew.
    programs/   the traced and lowered programs (jax.export), so a second
                run skips tracing the model too (StoredJit).
    peak.json   this machine's peak FLOP/s, measured once (perf.stored_peak).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import jax

from jaxgpt import workdir
from jaxgpt.data import cache_dir


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
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


# --- Traced programs -----------------------------------------------------------------

PROGRAMS = "programs"  # Under cache_dir(): serialized jax.export modules.


@functools.cache
def source_hash() -> str:
    """A hash of jaxgpt's own code and the library versions a program depends on:
    any change to them makes every stored program stale."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        h.update(path.read_bytes())
    for name in ("jax", "jaxlib", "flax", "optax"):
        h.update(f"{name} {importlib.metadata.version(name)}".encode())
    return h.hexdigest()


def _call_key(args) -> tuple:
    """What a call's program depends on: the arguments' tree and each leaf's
    shape, dtype and sharding (hashable and cheap: looked up at every call)."""
    leaves, tree = jax.tree.flatten(args)
    specs = tuple(
        (
            getattr(leaf, "shape", ()),
            getattr(leaf, "dtype", type(leaf)),
            getattr(leaf, "sharding", None),
        )
        for leaf in leaves
    )
    return tree, specs


def _signature(call_key: tuple) -> str:
    """_call_key as text, to name a stored program."""
    tree, specs = call_key
    return "\n".join([str(tree), *(f"{s} {d} {sh}" for s, d, sh in specs)])


def programs_dir() -> Path | None:
    """Where StoredJit keeps programs: beside the compilation cache, when on."""
    if not jax.config.jax_compilation_cache_dir:
        return None
    return Path(jax.config.jax_compilation_cache_dir).parent / PROGRAMS


def can_store_programs() -> bool:
    """Whether this process can keep programs (one process, jax.export works)."""
    return jax.process_count() == 1 and _can_export()


def storing_programs() -> bool:
    """Whether StoredJit keeps programs in this process (else it is jax.jit)."""
    return programs_dir() is not None and can_store_programs()


class StoredJit:
    """jax.jit(fn, **jit_kwargs), whose traced and lowered program is kept in
    the cache directory (jax.export) and read back by later runs, which then
    skip tracing: with the compilation cache, a second run neither traces nor
    compiles. `key` names what fn's Python closes over (configs, static
    options); the arguments' shapes, dtypes and shardings and source_hash()
    complete it. Falls back to plain jit where export is unavailable (no
    flatbuffers, several processes) or with the cache off."""

    def __init__(self, fn: Callable, key: str, directory: Path | None = None, **kw):
        self.jitted, self.key, self.kw = jax.jit(fn, **kw), key, kw
        self.directory = directory
        self.calls: dict[tuple, Callable] = {}

    def _program(self, args) -> Callable:
        call_key = _call_key(args)
        if call_key in self.calls:
            return self.calls[call_key]
        directory = self.directory or programs_dir()
        if directory is None or not can_store_programs():
            self.calls[call_key] = self.jitted
            return self.jitted
        text = f"{source_hash()}\n{self.key}\n{_signature(call_key)}"
        digest = hashlib.sha256(text.encode()).hexdigest()
        path = Path(directory) / f"{digest}.jaxexport"
        types_path = path.with_suffix(".types")
        try:  # The pytree node types first: deserialize needs them registered.
            register_node_types(json.loads(types_path.read_text()))
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except (OSError, ValueError, ImportError, AttributeError):
            exported = jax.export.export(self.jitted)(*args)
            types = node_types(exported.in_tree) | node_types(exported.out_tree)
            register_node_types(sorted(types))
            try:
                workdir.write_atomically(path, exported.serialize())
                workdir.write_atomically(types_path, json.dumps(sorted(types)))
            except OSError:
                pass  # An unwritable cache: traced again next time.
        # The same shardings and donation as the plain jit.
        program = jax.jit(exported.call, **self.kw)
        if b"lapack" not in exported.mlir_module_serialized:
            with lapack_not_needed():
                program.lower(*args)  # Kept by jit for the calls.
        self.calls[call_key] = program
        return program

    def __call__(self, *args):
        return self._program(args)(*args)

    def lower(self, *args):
        return self._program(args).lower(*args)


@contextlib.contextmanager
def lapack_not_needed():
    """Lowering a stored (jax.export) program on the CPU initialises jaxlib's
    LAPACK bindings, which imports scipy.linalg: 0.17-0.25 s of every run's
    start-up, for programs that make no LAPACK call. Inside this block that
    step is skipped (JAX's private hook jax._src.lax.linalg.initialize_lapack);
    where a JAX version lacks the hook, nothing changes."""
    try:
        from jax._src.lax import linalg

        initialize = linalg.initialize_lapack
    except (ImportError, AttributeError):
        yield
        return
    linalg.initialize_lapack = lambda: None
    try:
        yield
    finally:
        linalg.initialize_lapack = initialize


def node_types(treedef) -> set[str]:
    """ "module:qualname" of every custom node type in a pytree structure."""
    found, todo = set(), [treedef]
    while todo:
        node = todo.pop()
        data = node.node_data()
        if data is not None and data[0] not in (tuple, list, dict, type(None)):
            found.add(f"{data[0].__module__}:{data[0].__qualname__}")
        todo.extend(node.children())
    return found


_REGISTERED: set[str] = set()


def register_node_types(names) -> None:
    """Lets jax.export (de)serialize pytrees holding these types (named by
    node_types): namedtuples by their fields, others with pickled aux data."""
    for name in names:
        if name in _REGISTERED:
            continue
        module, qualname = name.split(":")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        try:
            if issubclass(cls, tuple) and hasattr(cls, "_fields"):
                jax.export.register_namedtuple_serialization(cls, serialized_name=name)
            else:
                jax.export.register_pytree_node_serialization(
                    cls,
                    serialized_name=name,
                    serialize_auxdata=pickle.dumps,
                    deserialize_auxdata=pickle.loads,
                )
        except ValueError:  # Registered already (by JAX or a library).
            pass
        _REGISTERED.add(name)


@functools.cache
def _can_export() -> bool:
    try:
        import flatbuffers  # noqa: F401  (jax.export's serialization needs it)
    except ImportError:
        return False
    return True
