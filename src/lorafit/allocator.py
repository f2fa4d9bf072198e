"""The memory allocator the CLI runs on: jemalloc where the machine has it, chosen before anything loads.

PyTorch on CPU takes every tensor from the C library's `malloc`. A training run allocates and frees
activations of a new shape at every batch (length-grouped batches differ in length), and glibc's
malloc does not hand the holes back: on Banking77 (all-MiniLM-L6-v2, LoRA, 2 epochs) its heap grew to
1.28 GB while 0.47-0.60 GB of it was in use, and the run's peak RSS climbed epoch after epoch (1.75 GB
after 2 epochs, 1.88 GB after 5). jemalloc and tcmalloc keep size classes apart and return what they
free: the same run peaked at 1.24 GB with jemalloc and 1.36 GB with tcmalloc, at the same speed or
better and with the same numbers to the digit (an allocator decides where tensors live, not what is
computed in them). README "Speed" has the measurements.

An allocator must be in place before the first `malloc`, so it is preloaded (`LD_PRELOAD`) and the
command starts once more, as the same process (`exec`: the PID, signals and exit status stay the
user's), before lorafit imports anything heavy. This happens only where lorafit runs as a program --
`lorafit ...` or `python -m lorafit ...`, which includes `torchrun -m lorafit` and the runs a sweep starts
-- and never when a Python program imports lorafit (`import lorafit` in a notebook keeps the
interpreter's allocator: start Python with `LD_PRELOAD=/path/to/libjemalloc.so.2` to get the same).

    LORAFIT_MALLOC=auto       # default: jemalloc if found, else tcmalloc if found, else the system's
    LORAFIT_MALLOC=jemalloc   # or tcmalloc: that one, and an error (exit 2) if this machine lacks it
    LORAFIT_MALLOC=system     # the C library's malloc, as before
    LORAFIT_MALLOC=/path/to/libsomething.so   # a library of your own

Debian/Ubuntu ship jemalloc as `libjemalloc2` and tcmalloc as `libtcmalloc-minimal4`; conda as
`jemalloc`. The relaunched process takes its own library out of `LD_PRELOAD` again, so the programs it
starts (a browser, a tokenizer's helper) run as they would have; lorafit processes it starts choose for
themselves. `summary.json` records the allocator a run trained on (`allocator`), read from the
libraries this process has loaded, not from the setting. Standard library only: it runs before torch
is imported.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["LIBRARIES", "active", "find", "resolve", "relaunch", "is_program"]

#: The file names each allocator's library goes by, most usual first.
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
_CHOICES = ("auto", "system", *LIBRARIES)
#: Set for the relaunched process only: "" where LD_PRELOAD was unset before, else "=" and its value, to give back.
_MARK = "_LORAFIT_MALLOC_RELAUNCHED"


def _dirs() -> list[Path]:
    """Where shared libraries are looked for: this environment's (a venv or conda), then the system's."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    places = [Path(sys.prefix) / "lib", Path(os.environ.get("CONDA_PREFIX", sys.prefix)) / "lib"]
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        if multiarch:
            places.append(Path(root) / multiarch)
        places.append(Path(root))
    places += [Path("/usr/lib64"), Path("/lib64")]
    return list(dict.fromkeys(places))


def find(name: str) -> Path | None:
    """The library file of allocator `name` (jemalloc, tcmalloc) on this machine, or None."""
    for folder in _dirs():
        for file in LIBRARIES[name]:
            if (folder / file).is_file():
                return folder / file
    return None


def _unknown(choice: str) -> str | None:
    """The message for a LORAFIT_MALLOC value that is neither a choice nor a path; None for one that is."""
    if choice in _CHOICES or "/" in choice:
        return None
    return f"LORAFIT_MALLOC={choice!r} is not one of {', '.join(_CHOICES)} or a path to a shared library"


def resolve(choice: str) -> Path | None:
    """The library to preload for a LORAFIT_MALLOC value; None for the system's malloc. A choice this
    machine cannot honour raises ValueError with a message for the user."""
    if choice == "system":
        return None
    if choice == "auto":
        return next((path for name in LIBRARIES if (path := find(name)) is not None), None)
    if choice in LIBRARIES:
        path = find(choice)
        if path is None:
            package = "libjemalloc2" if choice == "jemalloc" else "libtcmalloc-minimal4"
            raise ValueError(f"LORAFIT_MALLOC={choice}, but no {' or '.join(LIBRARIES[choice])} was found in "
                             f"{', '.join(str(d) for d in _dirs())}: install it (Debian/Ubuntu: {package}), name its "
                             f"file (LORAFIT_MALLOC=/path/to/lib.so), or set LORAFIT_MALLOC=auto or system")
        return path
    if "/" in choice:
        if not Path(choice).is_file():
            raise ValueError(f"LORAFIT_MALLOC={choice}: no such file")
        return Path(choice).resolve()
    raise ValueError(_unknown(choice))


def active() -> str:
    """The allocator this process runs on: `jemalloc` or `tcmalloc` where its library is loaded
    (preloaded or otherwise), `system` where neither is (or where this cannot be seen: not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in LIBRARIES:
        if f"/lib{name}" in maps:
            return name
    return "system"


def is_program() -> bool:
    """Whether this interpreter runs lorafit as a program: `python [options] -m lorafit ...` or the
    `lorafit` console script, not a program that imports it."""
    argv = getattr(sys, "orig_argv", None) or []
    if "-m" in argv[1:-1] and argv[argv.index("-m") + 1] == "lorafit":
        return "-c" not in argv[1:argv.index("-m")]
    return Path(sys.argv[0]).name == "lorafit" if sys.argv and sys.argv[0] else False


def relaunch() -> None:
    """Start this lorafit command again with the allocator LORAFIT_MALLOC asks for preloaded, as the same
    process (`os.execve`); return at once where there is nothing to do. Run before torch is imported."""
    given_back = os.environ.pop(_MARK, None)
    if given_back is not None:  # the relaunched process: take our library out of what children inherit
        if given_back.startswith("="):
            os.environ["LD_PRELOAD"] = given_back[1:]
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if not sys.platform.startswith("linux") or not is_program():
        return
    choice = os.environ.get("LORAFIT_MALLOC", "auto").strip() or "auto"
    try:
        if (unknown := _unknown(choice)) is not None:  # a bad value is an error even where nothing relaunches
            raise ValueError(unknown)
        if active() != "system":  # one is loaded already (the user's LD_PRELOAD): kept, whatever this machine has
            return
        library = resolve(choice)
    except ValueError as e:
        print(f"lorafit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if library is None:  # the system's asked for
        return
    before = os.environ.get("LD_PRELOAD")
    env = {**os.environ, _MARK: "" if before is None else f"={before}",
           "LD_PRELOAD": f"{library} {before}" if before else str(library)}
    if "tcmalloc" in library.name:  # tcmalloc reports every allocation above 1 GB on stderr
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
