"""`lorafit report`: HTML + Markdown with plots for a run and for a sweep, rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import lorafit
from lorafit.cli import main

from conftest import tiny_overrides
from test_compare import fake_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
NO_BROWSER = "chromium not installed: rendering not checked (apt-get install chromium); with CI=true this fails"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory):
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("report")
    data = write_dataset(root / "data")
    out = root / "run"
    lorafit.train(lorafit.load_config(None, tiny_overrides(tiny_bert, data, **{"train.epochs": 3})), out)
    return out


def _check_files(folder, figures: set[str]) -> str:
    page = (folder / "report.html").read_text()
    assert {p.name for p in (folder / "report_files").iterdir()} == {f"{f}.png" for f in figures}
    for name in figures:
        data = (folder / "report_files" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000
    assert page.count("src='data:image/png;base64,") == len(figures)
    assert "http://" not in page and "https://" not in page, "the page must be self-contained"
    markdown = (folder / "report.md").read_text()
    assert all(f"(report_files/{f}.png)" in markdown for f in figures)
    return page


def _render(page_path, tmp_path) -> tuple[str, str]:
    """DOM after load and the browser's log, from headless Chromium."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--dump-dom", page_path.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,3000",
                    f"--screenshot={shot}", page_path.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10, "the screenshot is blank"
    return done.stdout, done.stderr


@pytest.mark.ci_required
def test_run_report(run, tmp_path, capsys):
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "report written" in capsys.readouterr().out
    page = _check_files(tmp_path / "r", {"losses", "validation", "confusion", "per_class_f1", "reliability"})
    ev = json.loads((run / "eval.json").read_text())
    assert f"{100 * ev['accuracy']:.2f}%" in page
    assert f"temperature {ev['calibration']['temperature']:.3f} fitted on validation" in page
    for label in ("food", "sport", "travel"):
        assert f"<td>{label}</td>" in page
    (tmp_path / "a-file").write_text("x")
    assert main(["report", str(run), "--out", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip() == f"lorafit: error: {tmp_path / 'a-file'} exists and is not a folder; choose another --out"
    if CHROMIUM is None:
        pytest.skip(NO_BROWSER)
    dom, log = _render(tmp_path / "r" / "report.html", tmp_path)
    assert 'data-rendered="5/5"' in dom
    assert "Uncaught" not in log and "Failed to load" not in log


@pytest.mark.ci_required
def test_sweep_report(tmp_path):
    sweep = tmp_path / "sweep"
    for name in fake_sweep(sweep, 5):
        (sweep / name / "metrics.jsonl").write_text("".join(
            json.dumps({"type": "epoch", "epoch": e, "step": 10 * e, "val_loss": 1 / e, "val_accuracy": 0.8 + 0.05 * e,
                        "val_macro_f1": 0.78 + 0.05 * e}) + "\n" for e in (1, 2, 3)))
    assert main(["report", str(sweep)]) == 0
    page = _check_files(sweep, {"accuracy_vs_params", "losses", "validation", "misclassification", "confusion", "per_class_f1"})
    assert re.search(r"<td>rank=8</td><td>2</td>", page)
    assert "best" in page and "p (bootstrap)" in page and "p (McNemar)" in page
    if CHROMIUM is None:
        pytest.skip(NO_BROWSER)
    dom, log = _render(sweep / "report.html", tmp_path)
    assert 'data-rendered="6/6"' in dom
    assert "Uncaught" not in log


def test_mean_over_seeds_averages_only_where_every_seed_has_a_record():
    from lorafit.report import mean_over_seeds

    a = [{"type": "step", "step": 10, "loss": 1.0}, {"type": "step", "step": 20, "loss": 0.5},
         {"type": "epoch", "epoch": 1, "step": 20, "val_loss": 0.8}]
    b = [{"type": "step", "step": 10, "loss": 3.0}, {"type": "epoch", "epoch": 1, "step": 20, "val_loss": 0.4}]
    assert mean_over_seeds([a, b]) == [{"type": "step", "step": 10, "loss": 2.0},
                                       {"type": "epoch", "step": 20, "val_loss": pytest.approx(0.6)}]
