"""lorafit.hardware: the theoretical float32 peak from the CPU's vector extensions, microarchitecture and clock."""

from __future__ import annotations

import pytest

from lorafit.errors import UserError
from lorafit.hardware import check_measured_peak, cpu_info, theoretical_peak_gflops

AVX2 = ["sse4_2", "avx", "avx2", "fma", "f16c"]
AVX512 = AVX2 + ["avx512f", "avx512bw", "avx512vl"]


def fake_cpu(vendor="AuthenticAMD", family=25, model_id=1, flags=AVX2, cores=2, mhz=2450.0, max_mhz=None,
             model="AMD EPYC") -> dict:
    return {"model": model, "vendor": vendor, "family": family, "model_id": model_id, "flags": list(flags),
            "cores": cores, "mhz": mhz, "max_mhz": max_mhz}


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("LORAFIT_CPU_MAX_GHZ", raising=False)


def test_zen3_avx2_two_fma_units_at_the_stated_mhz():
    peak = theoretical_peak_gflops(fake_cpu(family=25, model_id=0x01, flags=AVX2, mhz=2450.0))
    assert peak["flop_per_cycle"] == 32 and peak["cores"] == 2 and peak["ghz"] == 2.45 and peak["microarchitecture"] == "AMD Zen 3"
    assert peak["gflops"] == pytest.approx(2 * 32 * 2.45)
    assert "/proc/cpuinfo" in peak["clock_source"] and "LORAFIT_CPU_MAX_GHZ" in peak["clock_source"]
    assert "2 cores x 32 FLOP/cycle x 2.45 GHz = 156.8 GFLOP/s" == peak["formula"]
    assert any("AVX2" in a and "FMA" in a for a in peak["assumptions"])


def test_zen4_avx512_is_double_pumped_256_bit():
    """Zen 4 (family 25 with AVX-512) runs 512-bit FMAs on its two 256-bit units: no more FLOP/cycle than Zen 3."""
    peak = theoretical_peak_gflops(fake_cpu(family=25, model_id=0x11, flags=AVX512, mhz=2596.152, max_mhz=3700.0))
    assert peak["flop_per_cycle"] == 32
    assert peak["ghz"] == 3.7 and "cpufreq" in peak["clock_source"]  # the highest the OS states
    assert peak["gflops"] == pytest.approx(2 * 32 * 3.7)
    assert any("Zen 4" in a and "256-bit" in a for a in peak["assumptions"])


def test_zen5_and_intel_server_avx512_have_two_512_bit_fma_units():
    zen5 = theoretical_peak_gflops(fake_cpu(family=26, model_id=0x02, flags=AVX512, cores=4, mhz=3000.0))
    assert zen5["flop_per_cycle"] == 64 and zen5["gflops"] == pytest.approx(4 * 64 * 3.0)
    xeon = theoretical_peak_gflops(fake_cpu(vendor="GenuineIntel", family=6, model_id=85, flags=AVX512, cores=2,
                                            mhz=2500.0, model="Intel(R) Xeon(R) Platinum 8280 CPU @ 2.70GHz"))
    assert xeon["flop_per_cycle"] == 64 and xeon["gflops"] == pytest.approx(2 * 64 * 2.5)
    assert any("2 AVX-512 FMA units" in a for a in xeon["assumptions"])  # the upper bound, said so


@pytest.mark.parametrize("cpu,expected", [
    (fake_cpu(family=23, model_id=0x01, flags=AVX2), 16),  # Zen 1: 128-bit FMA units
    (fake_cpu(family=23, model_id=0x31, flags=AVX2), 32),  # Zen 2
    (fake_cpu(vendor="GenuineIntel", family=6, model_id=63, flags=AVX2), 32),  # Haswell
    (fake_cpu(vendor="GenuineIntel", family=6, model_id=45, flags=["sse4_2", "avx"]), 16),  # Sandy Bridge: no FMA
    (fake_cpu(vendor="GenuineIntel", family=6, model_id=26, flags=["sse4_2"]), 8),
])
def test_older_cores(cpu, expected):
    assert theoretical_peak_gflops(cpu)["flop_per_cycle"] == expected


def test_unknown_cpu_gives_no_figure_and_says_why():
    arm = theoretical_peak_gflops(fake_cpu(vendor=None, family=None, model_id=None, flags=["asimd"], model="aarch64"))
    assert arm["gflops"] is None and arm["flop_per_cycle"] is None
    assert any("unknown" in a for a in arm["assumptions"])
    no_clock = theoretical_peak_gflops(fake_cpu(mhz=None))
    assert no_clock["gflops"] is None and no_clock["flop_per_cycle"] == 32 and no_clock["ghz"] is None


def test_clock_override(monkeypatch):
    monkeypatch.setenv("LORAFIT_CPU_MAX_GHZ", "3.5")
    peak = theoretical_peak_gflops(fake_cpu(mhz=2450.0, max_mhz=3000.0))
    assert peak["ghz"] == 3.5 and "LORAFIT_CPU_MAX_GHZ" in peak["clock_source"]
    assert peak["gflops"] == pytest.approx(2 * 32 * 3.5)
    monkeypatch.setenv("LORAFIT_CPU_MAX_GHZ", "fast")
    with pytest.raises(UserError, match="LORAFIT_CPU_MAX_GHZ='fast' is not a clock in GHz"):
        theoretical_peak_gflops(fake_cpu())


def test_a_measured_peak_above_the_theoretical_is_refused():
    """bench/speed.py once reported 454.5 GFLOP/s on 2 Zen 4 cores whose limit is 2 x 32 x 2.6 = 166 GFLOP/s."""
    peak = theoretical_peak_gflops(fake_cpu(family=25, model_id=0x11, flags=AVX512, mhz=2596.152))
    refusal = check_measured_peak(454.5, peak)
    assert refusal is not None and "454.5 GFLOP/s" in refusal and "166.2 GFLOP/s" in refusal
    assert check_measured_peak(150.0, peak) is None
    assert check_measured_peak(454.5, theoretical_peak_gflops(fake_cpu(flags=["asimd"], vendor=None))) is None  # nothing to check


def test_this_machine():
    """Whatever runs the tests: a figure with its assumptions, or None with the reason."""
    peak = theoretical_peak_gflops()
    assert peak["cores"] == cpu_info()["cores"]
    assert peak["assumptions"] and isinstance(peak["assumptions"][0], str)
    assert peak["gflops"] is None or peak["gflops"] > 0


def test_the_peak_is_for_the_threads_used_not_every_core():
    """bench/speed.py --threads 1 on a 16-core host: its matmul runs on one core, so one core's peak bounds
    it; checked against all 16 cores' a wrong measurement 12x too high would pass."""
    zen4 = fake_cpu(family=25, model_id=0x11, flags=AVX512, cores=16, mhz=2596.152)
    every_core = theoretical_peak_gflops(zen4)
    one = theoretical_peak_gflops(zen4, threads=1)
    assert every_core["cores"] == 16 and every_core["gflops"] == pytest.approx(16 * 32 * 2.596152)
    assert one["cores"] == 1 and one["gflops"] == pytest.approx(32 * 2.596152)
    assert one["formula"] == "1 core x 32 FLOP/cycle x 2.596 GHz = 83.1 GFLOP/s"
    assert any("1 thread" in a and "16" in a for a in one["assumptions"])
    assert theoretical_peak_gflops(zen4, threads=4)["gflops"] == pytest.approx(4 * 32 * 2.596152)
    assert theoretical_peak_gflops(zen4, threads=64)["cores"] == 16, "threads beyond the cores add no FMA units"
    assert theoretical_peak_gflops(zen4, threads=None) == every_core

    # 150 GFLOP/s measured with one thread: possible on 16 cores, impossible on the one that ran it.
    assert check_measured_peak(150.0, every_core) is None
    refusal = check_measured_peak(150.0, one)
    assert refusal is not None and "150.0 GFLOP/s" in refusal and "83.1 GFLOP/s" in refusal and "1 core x" in refusal
    assert check_measured_peak(80.0, one) is None
    with pytest.raises(ValueError, match="threads"):
        theoretical_peak_gflops(zen4, threads=0)
