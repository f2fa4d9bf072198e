"""The CLI's allocator: started as a program, lorafit runs on jemalloc where the machine has it (CI
installs Debian's libjemalloc2), gives LD_PRELOAD back to what it starts, never relaunches a program
that imports it, and trains the same numbers on any allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit import allocator

from conftest import tiny_overrides

JEMALLOC = allocator.find("jemalloc")
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="no libjemalloc on this machine (Debian: libjemalloc2)")

#: A program named `lorafit` (as the console script is) that says what it runs on.
PROBE = ("import json, os, lorafit\n"
         "print(json.dumps({'allocator': lorafit.allocator.active(), 'LD_PRELOAD': os.environ.get('LD_PRELOAD'),"
         " 'pid': os.getpid()}))\n")


def _env(**changes) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORAFIT_MALLOC", "LD_PRELOAD")}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, **changes)
    return env


def _probe(tmp_path: Path, **env) -> dict:
    script = tmp_path / "bin" / "lorafit"
    script.parent.mkdir(exist_ok=True)
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(script)], env=_env(**env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.ci_required
@needs_jemalloc
def test_the_program_relaunches_on_jemalloc_and_gives_ld_preload_back(tmp_path):
    seen = _probe(tmp_path)
    assert seen["allocator"] == "jemalloc"  # loaded in the process that runs the command
    assert seen["LD_PRELOAD"] is None  # ... and not handed on to what it starts
    seen = _probe(tmp_path, LD_PRELOAD="")
    assert (seen["allocator"], seen["LD_PRELOAD"]) == ("jemalloc", "")
    assert _probe(tmp_path, LORAFIT_MALLOC="system")["allocator"] == "system"
    assert _probe(tmp_path, LORAFIT_MALLOC=str(JEMALLOC))["allocator"] == "jemalloc"


@needs_jemalloc
def test_a_preloaded_allocator_is_kept(tmp_path):
    seen = _probe(tmp_path, LD_PRELOAD=str(JEMALLOC), LORAFIT_MALLOC="tcmalloc")  # one is loaded: no relaunch
    assert (seen["allocator"], seen["LD_PRELOAD"]) == ("jemalloc", str(JEMALLOC))


def test_importing_lorafit_never_relaunches():
    code = "import json, os, lorafit; print(json.dumps([lorafit.allocator.active(), os.environ.get('LD_PRELOAD')]))"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(LORAFIT_MALLOC="jemalloc"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # jemalloc asked for, maybe absent: no error either, it is not a program
    assert json.loads(proc.stdout) == ["system", None]


@pytest.mark.parametrize("value, message", [
    ("bogus", "LORAFIT_MALLOC='bogus' is not one of auto, system, jemalloc, tcmalloc or a path to a shared library"),
    ("/no/such/libjemalloc.so.2", "LORAFIT_MALLOC=/no/such/libjemalloc.so.2: no such file"),
])
def test_a_bad_setting_is_one_line_and_nothing_is_written(tmp_path, value, message):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lorafit", "train", "configs/banking77-lora.yaml", "--out", str(out)],
                          env=_env(LORAFIT_MALLOC=value), capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"lorafit: error: {message}"]
    assert not out.exists()


def test_the_library_search(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    assert allocator.resolve("auto") is None and allocator.resolve("system") is None
    with pytest.raises(ValueError, match=r"LORAFIT_MALLOC=jemalloc, but no libjemalloc.so.2 or libjemalloc.so was found.*libjemalloc2"):
        allocator.resolve("jemalloc")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.resolve("auto") == tmp_path / "b" / "libtcmalloc_minimal.so.4"  # the one there is
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "libjemalloc.so").write_bytes(b"")
    assert allocator.resolve("auto") == tmp_path / "a" / "libjemalloc.so"  # jemalloc first
    assert allocator.resolve("tcmalloc") == tmp_path / "b" / "libtcmalloc_minimal.so.4"


@pytest.mark.ci_required
@needs_jemalloc
def test_a_run_records_its_allocator_and_trains_the_same_numbers_on_any(tiny_bert, tiny_data, tmp_path):
    runs = {}
    for choice in ("auto", "system"):
        out = tmp_path / choice
        subprocess.run([sys.executable, "-m", "lorafit", "train", *tiny_overrides(tiny_bert, tiny_data), "--out", str(out),
                        "--quiet"], env=_env(LORAFIT_MALLOC=choice), check=True, timeout=300)
        runs[choice] = out
    read = lambda run, name: json.loads((run / name).read_text())  # noqa: E731
    assert read(runs["auto"], "summary.json")["allocator"] == "jemalloc"
    assert read(runs["system"], "summary.json")["allocator"] == "system"
    assert read(runs["auto"], "predictions.json") == read(runs["system"], "predictions.json")  # the same predictions
    # ... and the same loss up to float rounding: where a buffer starts can change which vector kernel a BLAS call
    # takes, so the last bits may differ (Zen 4: 1.1330199723 on jemalloc, 1.1330199761 on glibc; equal on Zen 5).
    assert read(runs["auto"], "eval.json")["loss"] == pytest.approx(read(runs["system"], "eval.json")["loss"], rel=1e-6)
