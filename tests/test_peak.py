"""tools/machine_peak.py: the CPU's fp32 peak from lscpu texts of several machines."""
import pytest
from helpers import load_tool

peak = load_tool("machine_peak")


def _lscpu(model, flags, *, vendor="GenuineIntel", family="6", cores=2, threads=1, extra=""):
    return (f"Architecture:            x86_64\nCPU(s):                  {cores * threads}\n"
            f"Vendor ID:               {vendor}\nModel name:              {model}\n"
            f"CPU family:              {family}\nThread(s) per core:      {threads}\n"
            f"Core(s) per socket:      {cores}\nSocket(s):               1\n{extra}"
            f"Flags:                   fpu sse sse2 {flags}\n")


def test_avx2_fma_vm_clock_from_bogomips():
    """The issue's VM: 2 cores, AVX2 + FMA, no AVX-512, no clock in the model name: 156 GFLOP/s."""
    text = _lscpu("AMD EPYC 7763 64-Core Processor", "avx fma avx2", vendor="AuthenticAMD", family="25",
                  extra="BogoMIPS:                4890.00\n")
    out = peak.cpu_peak(text)
    assert (out["cores"], out["lanes"], out["fma"], out["ghz"]) == (2, 8, True, 2.445)
    assert out["gflops"] == pytest.approx(2 * 2 * 8 * 2 * 2.445)  # 156.48
    assert "BogoMIPS 4890.00 / 2" in out["source"]


def test_avx512_clock_from_model_name_before_bogomips_and_max_mhz():
    text = _lscpu("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "avx fma avx2 avx512f avx512bw", cores=4,
                  threads=2, extra="CPU max MHz:             3500.0000\nBogoMIPS:                5800.00\n")
    out = peak.cpu_peak(text)
    assert (out["cores"], out["lanes"], out["ghz"]) == (4, 16, 2.9)  # physical cores, not threads
    assert out["gflops"] == pytest.approx(4 * 2 * 16 * 2 * 2.9)
    assert "@ 2.90GHz" in out["source"]


def test_zen4_avx512_counts_256_bit_units():
    text = _lscpu("AMD EPYC 9R14 96-Core Processor", "avx fma avx2 avx512f", vendor="AuthenticAMD",
                  family="25", extra="CPU max MHz:             3700.0000\n")
    out = peak.cpu_peak(text)
    assert out["lanes"] == 8 and out["gflops"] == pytest.approx(2 * 2 * 8 * 2 * 3.7)
    assert "turbo" in out["source"]


def test_avx_without_fma_has_separate_add_and_multiply_pipes():
    out = peak.cpu_peak(_lscpu("Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz", "avx", cores=8))
    assert (out["lanes"], out["fma"]) == (8, False)
    assert out["gflops"] == pytest.approx(8 * 2 * 8 * 1 * 2.6)


def test_sse_only_and_unknown_clock_or_architecture():
    assert peak.cpu_peak(_lscpu("Intel(R) Xeon(R) CPU E5420 @ 2.50GHz", "ssse3"))["lanes"] == 4
    no_clock = peak.cpu_peak(_lscpu("QEMU Virtual CPU", "avx fma"))
    assert no_clock["gflops"] is None and no_clock["source"] == "unknown: no clock in lscpu"
    arm = peak.cpu_peak("Architecture:  aarch64\nCPU(s): 4\nBogoMIPS: 50.00\nFlags: fp asimd\n")
    assert arm["gflops"] is None and "aarch64" in arm["source"]


def test_this_machine_has_a_source():
    out = peak.machine_peak()
    assert out["source"] and (out["gflops"] is None or out["gflops"] > 0)
