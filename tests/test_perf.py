import jax
import pytest

from jaxgpt import perf


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
