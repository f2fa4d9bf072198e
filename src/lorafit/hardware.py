"""Facts about the CPU this process runs on: model name, vector extensions, cores and clock.

Speed figures are only meaningful next to the machine they were measured on, so every figure lorafit
records (summary.json's kernel decision, bench/ output) carries `cpu_info()`. Read from
/proc/cpuinfo and sysfs on Linux; elsewhere the fields Python's `platform` knows.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

__all__ = ["cpu_info", "VECTOR_FLAGS"]

#: The /proc/cpuinfo flags that decide which float kernels a CPU can run.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


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
