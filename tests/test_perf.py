import json

import jax
import pytest

from jaxgpt.run import perf


@pytest.mark.parametrize(
    "kind,dtype,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
        ("NVIDIA A100-SXM4-40GB", "float32", 19.5),
        ("TPU v5 lite", "bfloat16", 197.0),
        ("TPU v2", "bfloat16", 45.0),
    ],
)
def test_known_peaks_come_from_the_data_sheet(kind, dtype, tflops):
    assert perf.known_peak(kind, dtype) == tflops * 1e12


def test_unknown_devices_or_dtypes_have_no_known_peak():
    assert perf.known_peak("cpu", "float32") is None
    assert perf.known_peak("TPU v2", "float32") is None  # No fp32 figure listed.


def test_peak_is_given_or_measured_on_cpu():
    assert perf.peak_flops("float32", tflops=2.0) == (2e12, "given")
    peak, source = perf.peak_flops("float32", n=256)
    if jax.devices()[0].platform == "cpu":
        assert source.startswith("measured") and 1e8 < peak < 1e14


def test_mfu_divides_model_flops_by_the_peak_of_all_devices():
    # 1e6 FLOPs/token at 1e4 tokens/s = 1e10 FLOP/s, over 4 devices of 1e11.
    assert perf.mfu(1e6, 1e4, 1e11, devices=4) == pytest.approx(0.025)


@pytest.fixture
def fake_measure(monkeypatch):
    """measure_peak returning the queued values in turn; the calls, recorded."""
    queued, calls = [], []

    def measure(dtype, n, repeats):
        calls.append((dtype, n))
        return queued.pop(0)

    monkeypatch.setattr(perf, "measure_peak", measure)
    monkeypatch.setattr(perf, "load_per_core", lambda: 0.1)  # A quiet machine.
    return queued, calls


def age(store, days: float, load: float | None = None) -> None:
    """Makes every stored peak `days` old (and measured at `load`)."""
    table = json.loads(store.read_text())
    for entry in table.values():
        entry["measured_at"] -= days * 86400
        entry["load_per_core"] = load if load is not None else entry["load_per_core"]
    store.write_text(json.dumps(table))


def test_stored_peak_is_the_best_trial_and_is_read_back(tmp_path, fake_measure):
    queued, calls = fake_measure
    queued += [5e9, 1e9, 3e9, 2e9, 4e9]
    store = tmp_path / "peak.json"
    peak, how = perf.stored_peak("float32", store, n=64)
    assert peak == 5e9 and len(calls) == 5 and "none stored" in how
    peak, how = perf.stored_peak("float32", store, n=64)
    assert peak == 5e9 and len(calls) == 5 and "stored in" in how  # Read back.
    peak, source = perf.peak_flops("float32", n=64, store=store)
    assert peak == 5e9 and source.startswith("measured") and len(calls) == 5
    assert perf.peak_flops("float32", tflops=0.5, store=store) == (5e11, "given")


def test_an_old_peak_is_measured_again_and_the_best_ever_kept(tmp_path, fake_measure):
    queued, calls = fake_measure
    store = tmp_path / "peak.json"
    queued += [4e9] * 5
    perf.stored_peak("float32", store, n=64)
    age(store, days=perf.PEAK_MAX_AGE_DAYS - 1)  # Young enough: read back.
    assert perf.stored_peak("float32", store, n=64)[0] == 4e9 and len(calls) == 5
    age(store, days=2)  # Now older than PEAK_MAX_AGE_DAYS.
    queued += [3e9] * 5  # A busier moment: lower, so the best ever stays.
    peak, how = perf.stored_peak("float32", store, n=64)
    assert peak == 4e9 and len(calls) == 10 and "days old" in how
    age(store, days=perf.PEAK_MAX_AGE_DAYS + 1)
    queued += [2e9, 6e9, 1e9, 1e9, 1e9]  # A quieter one: higher, kept.
    assert perf.stored_peak("float32", store, n=64)[0] == 6e9 and len(calls) == 15
    assert perf.stored_peak("float32", store, n=64)[0] == 6e9 and len(calls) == 15


def test_a_peak_measured_under_load_is_measured_again_when_quiet(
    tmp_path, fake_measure, monkeypatch
):
    queued, calls = fake_measure
    store = tmp_path / "peak.json"
    busy = 2 * perf.LOADED
    monkeypatch.setattr(perf, "load_per_core", lambda: busy)
    queued += [1e9] * 5
    perf.stored_peak("float32", store, n=64)
    assert perf.stored_peak("float32", store, n=64)[0] == 1e9  # Still busy: kept.
    monkeypatch.setattr(perf, "load_per_core", lambda: 0.6 * busy)  # Not by half.
    assert perf.stored_peak("float32", store, n=64)[0] == 1e9
    assert len(calls) == 5
    monkeypatch.setattr(perf, "load_per_core", lambda: 0.0)  # Quiet now.
    queued += [3e9] * 5
    peak, how = perf.stored_peak("float32", store, n=64)
    assert peak == 3e9 and len(calls) == 10 and "under load" in how
    assert perf.stored_peak("float32", store, n=64)[0] == 3e9 and len(calls) == 10
    queued += [2e9] * 5  # --measure_peak measures again; the best stays.
    assert perf.stored_peak("float32", store, n=64, force=True)[0] == 3e9
    assert len(calls) == 15


def test_stored_peak_is_per_machine_dtype_and_size(tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "measure_peak", lambda dtype, n, repeats: float(n))
    store = tmp_path / "peak.json"
    perf.stored_peak("float32", store, n=64)
    assert perf.stored_peak("bfloat16", store, n=64)[0] == 64.0  # Not fp32's.
    assert perf.stored_peak("float32", store, n=32)[0] == 32.0  # Other size.
    monkeypatch.setattr(perf, "machine_key", lambda dtype: f"another machine {dtype}")
    assert "none stored" in perf.stored_peak("float32", store, n=32)[1]


def test_a_corrupt_or_unwritable_store_measures_again(tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "measure_peak", lambda dtype, n, repeats: 7.0)
    store = tmp_path / "peak.json"
    store.write_text("{not json")
    assert "none stored" in perf.stored_peak("float32", store, n=16)[1]
    assert perf.stored_peak("float32", store, n=16)[1].startswith("stored in")
    blocked = tmp_path / "file" / "peak.json"
    (tmp_path / "file").write_text("a file where a folder should be")
    assert perf.stored_peak("float32", blocked, n=16)[0] == 7.0
    assert "none stored" in perf.stored_peak("float32", blocked, n=16)[1]


def test_matmul_params_leave_out_the_lookup_tables():
    """N of 6N, counted by hand: the tied token table counts (it is the output
    layer), the position table does not; untied, the lm_head counts instead of
    the token table."""
    from jaxgpt.config import ModelConfig

    C, V, T = 16, 50, 8
    block = 2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C  # Norms, attn, MLP.
    shape = {"vocab_size": V, "n_embd": C, "block_size": T, "n_layer": 1, "n_head": 2}
    tied = ModelConfig(**shape)
    assert perf.matmul_params(tied) == V * C + block + C  # + the final norm.
    untied = ModelConfig(**shape, tie_embeddings=False)
    assert perf.matmul_params(untied) == V * C + block + C


def test_measured_peak_is_a_plausible_flop_rate():
    """measure_peak against the time of the same matmul taken here."""
    import time

    import jax.numpy as jnp

    n = 256
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    slowest_possible = 2 * n**3 / ((time.perf_counter() - t0) / 5) / 20
    assert perf.measure_peak("float32", n=n) > slowest_possible


def test_allocator_settings_apply_on_linux():
    import sys

    assert perf.keep_freed_memory() == sys.platform.startswith("linux")


def test_unrolled_threefry_draws_the_same_bits():
    """perf.unroll_threefry changes how the hash compiles on a CPU (no loop),
    never what it draws: bits, dropout-style masks, fold_in and categorical."""
    import chex
    import jax.numpy as jnp
    from jax.interpreters import mlir

    threefry = perf.jax_threefry()

    def draw(key):
        return (
            jax.random.bits(key, (3, 5), jnp.uint32),
            jax.random.bernoulli(key, 0.8, (1000,)),
            jax.random.fold_in(key, 9),
            jax.random.categorical(key, jnp.zeros((4, 7))),
        )

    def use_jax_default():  # (A test that ran main.main here unrolled it.)
        rule = threefry._threefry2x32_cpu_lowering_rule
        mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")

    key = jax.random.PRNGKey(7)
    use_jax_default()
    rolled = jax.jit(draw).lower(key).as_text()
    want = jax.jit(draw)(key)
    try:
        assert perf.unroll_threefry()
        unrolled = jax.jit(lambda k: draw(k))
        assert "while" in rolled and "while" not in unrolled.lower(key).as_text()
        chex.assert_trees_all_equal(unrolled(key), want)
    finally:  # The default again, for the tests that follow in this process.
        use_jax_default()


@pytest.mark.parametrize(
    "batch,devices,rounded",
    [(12, 8, 16), (16, 8, 16), (1, 8, 8), (5, 1, 5), (65, 4, 68)],
)
def test_round_batch_goes_up_to_a_multiple_of_the_devices(batch, devices, rounded):
    assert perf.round_batch(batch, devices) == rounded


def test_the_stored_peak_tells_cpu_generations_apart():
    """lscpu names a Zen 2 and a Zen 4 EPYC alike; their peaks differ 2-3x."""
    zen2 = "model name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 49\n"
    zen4 = "model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n"
    assert perf.cpu_name(zen2) == "AMD EPYC (family 23 model 49)"
    assert perf.cpu_name(zen2) != perf.cpu_name(zen4)
    assert perf.cpu_name("") != ""
