"""Facts about the CPU this process runs on: model name, vector extensions, cores and clock.

Speed figures are only meaningful next to the machine they were measured on, so every figure lorafit
records (summary.json's kernel decision, bench/ output) carries `cpu_info()`. Read from
/proc/cpuinfo and sysfs on Linux; elsewhere the fields Python's `platform` knows.

`theoretical_peak_gflops()` bounds what a float32 measurement can show (cores x FLOP/cycle x clock),
so a benchmark can refuse a "peak" above what the hardware does (`check_measured_peak`). The cores
are those the measurement ran on: with `threads` below the core count, the peak is that many cores'.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

from .errors import UserError

log = logging.getLogger("lorafit")

__all__ = ["cpu_info", "cpu_line", "VECTOR_FLAGS", "native_bf16", "warn_if_emulated_bf16", "theoretical_peak_gflops", "check_measured_peak"]

#: The /proc/cpuinfo flags that decide which float kernels a CPU can run.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _max_mhz() -> float | None:
    """The highest clock the OS states: cpufreq's maximum where exposed (bare metal), else None."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        return None


@functools.cache
def cpu_info() -> dict:
    """{model, vendor, family, model_id, flags (vector extensions), cores (usable by this process),
    mhz (as /proc/cpuinfo reports it), max_mhz (cpufreq's maximum, None in most VMs)}."""
    fields = _cpuinfo_fields()
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        mhz = float(fields["cpu MHz"])
    except (KeyError, ValueError):
        mhz = None
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id"),
        "family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "model_id": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "flags": [f for f in VECTOR_FLAGS if f in flags],
        "cores": cores,
        "mhz": mhz,
        "max_mhz": _max_mhz(),
    }


def native_bf16(info: dict | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX-512 BF16 or AMX; Arm's BF16 extension, `bf16` in
    /proc/cpuinfo's Features), so bf16 inference runs faster than float32 instead of being emulated (slower).
    Without /proc/cpuinfo (macOS) nothing is known: False."""
    flags = (info or cpu_info())["flags"]
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def warn_if_emulated_bf16(what: str) -> None:
    """Warn that `what` (e.g. "train.precision=bf16") runs emulated, slower than float32, on a CPU without
    native bf16; say nothing where the CPU has it."""
    if not native_bf16():
        log.warning(f"this CPU has no native bf16 (AVX-512 BF16, AMX or Arm BF16): {what} is emulated here and "
                    "slower than fp32")


def cpu_line(info: dict | None = None) -> str:
    """The line benchmarks print before any figure: model, family/model ids, cores and vector flags."""
    cpu = info or cpu_info()
    return (f"CPU: {cpu.get('model')} (family {cpu.get('family')} model {cpu.get('model_id')}; {cpu.get('cores')} cores; "
            f"flags {', '.join(cpu.get('flags', []))})")


#: Overrides the clock of the theoretical peak, in GHz: boost clocks can exceed what a VM reports.
CLOCK_OVERRIDE = "LORAFIT_CPU_MAX_GHZ"


def _flop_per_cycle(info: dict) -> tuple[int | None, str, str]:
    """float32 FLOP per cycle and core: (figure or None, microarchitecture, the assumption behind it).

    FMA counts 2 FLOP per lane. Figures are upper bounds: where parts of one family differ (Intel's
    AVX-512 cores have 1 or 2 FMA units), the larger is taken, so that a real measurement is never
    refused.
    """
    flags, vendor, family, model = set(info.get("flags") or ()), info.get("vendor"), info.get("family"), info.get("model_id")
    if vendor == "AuthenticAMD" and family == 26 and "avx512f" in flags:
        return 64, "AMD Zen 5", "Zen 5 (family 26): 2 FMA units with full 512-bit datapaths x 16 float32 lanes x 2 (FMA) = 64 " \
                                "FLOP/cycle (mobile Zen 5 double-pumps 256-bit units: half that)"
    if vendor == "AuthenticAMD" and family == 25 and "avx512f" in flags:
        return 32, "AMD Zen 4", "Zen 4 (family 25 with AVX-512): 512-bit FMAs run double-pumped on 2 256-bit units, so " \
                                "2 x 8 float32 lanes x 2 (FMA) = 32 FLOP/cycle, as with AVX2"
    if vendor == "AuthenticAMD" and family == 23 and model is not None and model < 0x30 and "fma" in flags:
        return 16, "AMD Zen 1/Zen+", "Zen 1/Zen+ (family 23, model < 0x30): 2 128-bit FMA units x 4 float32 lanes x 2 " \
                                     "= 16 FLOP/cycle"
    if vendor == "GenuineIntel" and "avx512f" in flags:
        return 64, "Intel with AVX-512", "Intel AVX-512: assumes 2 AVX-512 FMA units (Xeon Scalable Gold/Platinum, Sapphire " \
                                         "Rapids and later) x 16 lanes x 2 = 64 FLOP/cycle; cores with 1 unit (Xeon " \
                                         "Silver/Bronze, client parts) reach half"
    if "avx2" in flags and "fma" in flags:
        where = ({23: "AMD Zen 2", 25: "AMD Zen 3"}.get(family, "AMD") if vendor == "AuthenticAMD"
                 else "Intel Haswell or later" if vendor == "GenuineIntel" else f"{vendor or 'x86'} with AVX2+FMA")
        return 32, where, "AVX2+FMA: 2 FMA units x 8 float32 lanes x 2 (FMA) = 32 FLOP/cycle"
    if "avx" in flags:
        return 16, "x86 with AVX, no FMA", "AVX without FMA: 1 add + 1 multiply unit x 8 float32 lanes = 16 FLOP/cycle"
    if "sse4_2" in flags:
        return 8, "x86 with SSE only", "SSE: 1 add + 1 multiply unit x 4 float32 lanes = 8 FLOP/cycle"
    return None, "unknown", f"unknown microarchitecture ({info.get('model')}; vector extensions: " \
                            f"{' '.join(sorted(flags)) or 'none known'}): no FLOP/cycle figure, so no theoretical peak"


def _clock_ghz(info: dict) -> tuple[float | None, str]:
    """The highest clock stated: LORAFIT_CPU_MAX_GHZ, else cpufreq's maximum, else /proc/cpuinfo's MHz."""
    override = os.environ.get(CLOCK_OVERRIDE)
    if override:
        try:
            ghz = float(override)
        except ValueError:
            ghz = 0.0
        if not 0 < ghz < 20:
            raise UserError(f"{CLOCK_OVERRIDE}={override!r} is not a clock in GHz; give e.g. {CLOCK_OVERRIDE}=3.7")
        return ghz, f"{CLOCK_OVERRIDE}={override} (set by the user)"
    if info.get("max_mhz"):
        return info["max_mhz"] / 1000, "cpufreq's cpuinfo_max_freq (the highest clock the OS states, boost included)"
    if info.get("mhz"):
        return info["mhz"] / 1000, (f"/proc/cpuinfo's 'cpu MHz' (no cpufreq here, as in most VMs; boost clocks can be "
                                    f"higher, which would raise this peak: set {CLOCK_OVERRIDE} to the CPU's maximum boost)")
    return None, f"no clock known (no cpufreq, no 'cpu MHz'; set {CLOCK_OVERRIDE})"


def theoretical_peak_gflops(info: dict | None = None, threads: int | None = None) -> dict:
    """The float32 FLOP/s the cores a measurement ran on cannot exceed: cores x FLOP/cycle x clock, with its
    assumptions.

    `threads`: the threads the measurement used (torch's intra-op threads); each runs on one core at a
    time, so the peak counts min(threads, usable cores) cores. None: every core this process may use.
    Returns {gflops (None when a factor is unknown), cores (those counted), usable_cores, flop_per_cycle,
    ghz, microarchitecture, clock_source, formula, assumptions: [str, ...]}, every part printable next
    to a measured figure. `info` defaults to this machine's `cpu_info()`.
    """
    info = cpu_info() if info is None else info
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    flop, arch, why = _flop_per_cycle(info)
    ghz, clock_source = _clock_ghz(info)
    usable = int(info.get("cores") or 1)
    cores = usable if threads is None else min(threads, usable)
    smt = "SMT siblings share FMA units, so with SMT on this overstates the peak"
    counted = (f"{cores} cores = the logical CPUs this process may use ({smt})" if threads is None else
               f"{cores} core{'s' if cores > 1 else ''} = the {threads} thread{'s' if threads > 1 else ''} the measurement "
               f"used, of {usable} logical CPUs this process may use (threads beyond the cores add no FMA units; {smt})")
    assumptions = [why, f"clock: {clock_source}", counted]
    gflops = cores * flop * ghz if flop and ghz else None
    formula = (f"{cores} core{'s' if cores > 1 else ''} x {flop} FLOP/cycle x {ghz:.4g} GHz = {gflops:.1f} GFLOP/s"
               if gflops is not None else "no theoretical peak: " + (why if flop is None else clock_source))
    return {"gflops": gflops, "cores": cores, "usable_cores": usable, "flop_per_cycle": flop, "ghz": ghz,
            "microarchitecture": arch, "clock_source": clock_source, "formula": formula, "assumptions": assumptions}


def check_measured_peak(measured_gflops: float, theoretical: dict) -> str | None:
    """Why a measured float32 peak cannot be trusted (it exceeds the theoretical one), or None."""
    limit = theoretical.get("gflops")
    if limit is None or measured_gflops <= limit:
        return None
    return (f"measured peak {measured_gflops:.1f} GFLOP/s exceeds the theoretical {limit:.1f} GFLOP/s "
            f"({theoretical['formula']}): the measurement is wrong or the host is not what it states; if the CPU boosts "
            f"above the stated clock, set {CLOCK_OVERRIDE}")
