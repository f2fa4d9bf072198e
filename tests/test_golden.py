"""Golden run: a tiny fixed training run whose outputs must not change when the code is reorganised.

Two runs on a tiny random BERT built from a fixed seed: LoRA (PyTorch kernels, two micro-batch
pieces per batch, gradient accumulation, checkpoints) and full fine-tuning (oneDNN linear and fast
dropout forced on, so those paths are pinned too). What is pinned: eval.json, predictions.json,
summary.json without its timings and host facts, the epoch/step records of metrics.jsonl without
timings, splits.json, labels.json, and the sha256 of every tensor of the trained artifact.

Float results depend on the CPU's vector ISA and vendor (MKL and oneDNN pick kernels by both), so goldens
are kept per `torch.backends.cpu.get_cpu_capability()` and vendor (`_host`): on a host that has an entry the
comparison is exact (byte-identical JSON values, identical tensors); on another host it falls back to the closest
entry at 1e-4 (tensors: same names and shapes), and says so. Regenerate (only when a change is
*meant* to alter results, and say why in the commit):

    python tests/test_golden.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "tiny_run.json"

#: summary.json keys that are times, memory or facts about the host or installed versions; and the
#: adapter's size in bytes, which counts the (temporary) base model path written in adapter_config.json
#: (the tensors themselves are pinned by digest).
VOLATILE = {"train_seconds", "seconds_per_epoch", "train_examples_per_second", "peak_memory_mb", "versions", "compute",
            "threads", "device", "adapter_bytes", "allocator"}
RUNS = {
    "lora": {"method.name": "lora", "train.cpu_kernels": "stock", "train.grad_accum": 2, "train.max_batch_tokens": 40,
             "train.checkpoint_every": 3, "train.epochs": 3, "train.metric": "loss"},
    "full": {"method.name": "full", "train.cpu_kernels": "onednn", "train.epochs": 2, "train.lr": 1e-3},
}


def _host() -> str:
    """The vector ISA PyTorch dispatches to and the CPU's vendor: MKL and oneDNN pick kernels by both (an AVX-512
    golden made on AMD differed from an Intel AVX-512 run by ~2e-9 of a loss)."""
    from lorafit.hardware import cpu_info

    return f"{torch.backends.cpu.get_cpu_capability()} {cpu_info().get('vendor') or 'unknown'}"


def _tensor_digests(folder: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, value in sorted(load_file(file).items()):
            digests[f"{file.name}:{name}"] = f"{value.dtype}{list(value.shape)}:" + hashlib.sha256(value.tobytes()).hexdigest()
    return digests


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _outputs(out: Path, artifact: str, root: Path) -> dict:
    read = lambda name: json.loads((out / name).read_text(encoding="utf-8"))  # noqa: E731
    summary = {k: v for k, v in read("summary.json").items() if k not in VOLATILE}
    metrics = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "examples_per_second")}
               for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    outputs = {"eval": read("eval.json"), "predictions": read("predictions.json"), "summary": summary, "metrics": metrics,
               "splits": read("splits.json"), "labels": read("labels.json"), "tensors": _tensor_digests(out / artifact)}
    return json.loads(json.dumps(outputs).replace(str(root), "ROOT"))  # the temporary folder's name is not pinned


def run_golden(root: Path) -> dict[str, dict]:
    """Build the tiny model and data under `root`, train both runs, return their pinned outputs."""
    sys.path.insert(0, str(HERE))
    from conftest import build_tiny_encoder, tiny_overrides, write_dataset

    from lorafit.cli import main

    model = build_tiny_encoder(root / "model", "bert", seed=0)
    data = write_dataset(root / "data", n_train=90, n_test=30, seed=3)
    results = {}
    for name, extra in RUNS.items():
        overrides = tiny_overrides(model, data, **extra)
        if name == "full":
            overrides = [o for o in overrides if not o.startswith(("method.rank", "method.alpha"))]
        out = root / name
        assert main(["train", *overrides, "--out", str(out)]) == 0
        results[name] = _outputs(out, "model" if name == "full" else "adapter", root)
        results[name]["_folder"] = str(out)
    return results


def _close(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_golden_run_outputs_are_unchanged(tmp_path):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    results = run_golden(tmp_path)
    host = _host()
    exact = host in golden
    reference = golden[host] if exact else next(iter(golden.values()))
    for name, expected in reference.items():
        got = results[name]
        if exact:
            for part in expected:
                assert got[part] == expected[part], f"{name}: {part} differs from the golden run ({host})"
        else:  # another vector ISA: MKL/oneDNN sum in another order; same structure, values within 1e-4
            for part in ("eval", "predictions", "summary", "metrics", "splits", "labels"):
                _close(got[part], expected[part], f"{name}.{part}")
            assert {k: v.split(":")[0] for k, v in got["tensors"].items()} == \
                   {k: v.split(":")[0] for k, v in expected["tensors"].items()}
    if not exact:
        warnings.warn(f"no golden for CPU {host!r} (have {sorted(golden)}): compared within 1e-4 only; "
                      "add this host's with: python tests/test_golden.py --write", stacklevel=1)


if __name__ == "__main__":
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --write   (regenerates tests/golden/tiny_run.json for this host)")
    with tempfile.TemporaryDirectory() as tmp:
        results = run_golden(Path(tmp))
    for r in results.values():
        r.pop("_folder")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8")) if GOLDEN.is_file() else {}
    golden[_host()] = results
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN} for CPU {_host()!r}")
