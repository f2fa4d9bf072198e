"""`lorafit sweep`: trials from a grid, run folders, skip/resume/redo on re-run, bad sweep files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main
from lorafit.errors import UserError
from lorafit.sweep import plan, read_spec, run_sweep, trial_status

from conftest import tiny_overrides


def _sweep_file(tmp_path, tiny_bert, data, grid, **extra):
    base = tmp_path / "base.yaml"
    tree: dict = {}
    for item in tiny_overrides(tiny_bert, data, **{"train.epochs": 1}):
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    base.write_text(yaml.safe_dump(tree))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "grid": grid, **extra}, sort_keys=False))
    return path


def test_plan_expands_the_grid_and_alpha_multiples(tmp_path, tiny_bert, tiny_data):
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"method.rank": [2, 4], "method.alpha": ["1x", "2x"], "seed": [0, 1]},
                       overrides={"train.lr": 0.01})
    spec, base = read_spec(path)
    trials = plan(spec, base)
    assert len(trials) == 8
    assert trials[0].name == "rank=2,alpha=1x,seed=0"
    alphas = {(t.values["method.rank"], t.values["method.alpha"]) for t in trials}
    assert alphas == {(2, 2.0), (2, 4.0), (4, 4.0), (4, 8.0)}
    assert "train.lr=0.01" in trials[0].overrides(spec)


def test_seed_in_a_value_is_each_trials_seed(tmp_path, tiny_bert, tiny_data):
    """A teacher per seed (distill.teacher: .../seed={seed}); without a swept seed, the base config's."""
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"seed": [0, 3]}, overrides={"distill.teacher": "teachers/seed={seed}"})
    spec, base = read_spec(path)
    assert [[o for o in t.overrides(spec) if o.startswith("distill.")] for t in plan(spec, base)] == [
        ["distill.teacher=teachers/seed=0"], ["distill.teacher=teachers/seed=3"]]
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"method.rank": [2]}, overrides={"distill": {"teacher": "t/seed={seed}"}})
    (tmp_path / "base.yaml").write_text((tmp_path / "base.yaml").read_text() + "seed: 5\n")
    spec, base = read_spec(path)
    assert "distill={teacher: t/seed=5}" in plan(spec, base)[0].overrides(spec)


def test_base_as_a_grid_key_gives_each_trial_its_config(tmp_path, tiny_bert, tiny_data):
    _sweep_file(tmp_path, tiny_bert, tiny_data, {"seed": [0]})  # writes base.yaml
    full = tmp_path / "full.yaml"
    tree = yaml.safe_load((tmp_path / "base.yaml").read_text())
    tree["method"] = {"name": "full"}
    full.write_text(yaml.safe_dump(tree))
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump({"overrides": {"train.epochs": 2}, "grid": {"base": [str(tmp_path / "base.yaml"), str(full)],
                                                                                "seed": [0, 1]}}, sort_keys=False))
    spec, base = read_spec(path)
    trials = plan(spec, base, path)
    assert [t.name for t in trials] == ["base=base,seed=0", "base=base,seed=1", "base=full,seed=0", "base=full,seed=1"]
    assert trials[2].base == full and "train.epochs=2" in trials[2].overrides(spec)
    assert not any(o.startswith("base=") for o in trials[2].overrides(spec))


def test_random_search_is_seeded_and_within_bounds(tmp_path, tiny_bert, tiny_data):
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "method.dropout": {"choice": [0.0, 0.2]}}
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"seed": [0]}, random={"samples": 5, "seed": 3, "space": space})
    spec, base = read_spec(path)
    first, again = plan(spec, base), plan(spec, base)
    assert first == again and len(first) == 5
    assert all(1e-4 <= t.values["train.lr"] <= 1e-2 and t.values["method.dropout"] in (0.0, 0.2) for t in first)
    assert len({t.values["train.lr"] for t in first}) == 5


@pytest.mark.parametrize("grid,extra,message", [
    ({"method.rank": [0, 4]}, {}, "trial rank=0: config error"),
    ({"method.nope": [1]}, {}, "trial nope=1: config error"),
    ({"method.alpha": ["2x"]}, {}, "multiplies method.rank, which the sweep does not set"),
    ({}, {}, "give a grid and/or random search"),
    ({"seed": []}, {}, "grid seed has no values"),
    ({"seed": [0]}, {"grdi": {}}, "Extra inputs are not permitted"),
])
def test_bad_sweep_files_fail_before_any_trial(tmp_path, tiny_bert, tiny_data, grid, extra, message):
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, grid, **extra)
    with pytest.raises(UserError, match=message):
        run_sweep(path, tmp_path / "out", report=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_sweep_runs_skips_resumes_and_redoes(tmp_path, tiny_bert, tiny_data, capsys):
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"method.rank": [2, 4], "seed": [0]})
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("accuracy") == 2 and "2 of 2 trials finished" in printed
    names = ["rank=2,seed=0", "rank=4,seed=0"]
    assert json.loads((out / "sweep.json").read_text())["trials"][1]["name"] == names[1]
    for name in names:
        assert trial_status(out / name) == "finished"
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["threads"] == 1  # 2 cores / 2 workers
    first = json.loads((out / names[0] / "eval.json").read_text())

    # Break one trial (an interrupted copy without its checkpoints), leave the other finished.
    shutil.rmtree(out / names[1] / "adapter")
    (out / names[1] / "summary.json").unlink()
    assert trial_status(out / names[1]) == "broken"
    results = run_sweep(path, out, report=print)
    printed = capsys.readouterr().out
    assert f"{names[0]}: finished earlier, skipped" in printed
    assert [r["outcome"] for r in results] == ["skipped (finished)", "ran"]
    assert trial_status(out / names[1]) == "finished"
    assert json.loads((out / names[0] / "eval.json").read_text()) == first


def test_progress_lines_show_validation_never_test(tmp_path, tiny_bert, tiny_data, monkeypatch):
    """A trial's progress line quotes its best-epoch validation figure; test figures wait for `lorafit compare`."""
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"method.rank": [2, 4]})

    def fake_execute(command, log_path):  # a finished trial, without training
        out = Path(command[command.index("--out") + 1])
        rank = int(out.name.split("=")[1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"best_validation": {"accuracy": 0.5 + rank / 100},
                                                      "test_accuracy": 0.0123, "test_macro_f1": 0.0456}))
        (out / "eval.json").write_text("{}")
        return 0, "", 1.0

    monkeypatch.setattr("lorafit.sweep._timed_execute", fake_execute)
    lines = []
    results = run_sweep(path, tmp_path / "sweep", report=lines.append)
    assert lines == ["[1/2] rank=2: validation accuracy 0.5200 (best epoch), ran, 1 s",  # one worker: in order
                     "[2/2] rank=4: validation accuracy 0.5400 (best epoch), ran, 1 s"]
    assert not any("0.0123" in line or "0.0456" in line for line in lines)
    assert [r["validation"] for r in results] == [{"accuracy": 0.52}, {"accuracy": 0.54}]


def test_a_failing_trial_is_reported_and_the_others_run(tmp_path, tiny_bert, tiny_data, capsys):
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"train.lr": [0.01, 1.0e+6]})
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "lr=1000000.0: failed (lorafit: error: loss became" in printed
    assert "1 of 2 trials finished" in printed and "failed: lr=1000000.0" in printed


def test_a_changed_base_config_is_refused(tmp_path, tiny_bert, tiny_data):
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"seed": [0]})
    out = tmp_path / "sweep"
    run_sweep(path, out, report=lambda line: None)
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("lr: 0.005", "lr: 0.001"))
    with pytest.raises(UserError, match="changed since"):
        run_sweep(path, out, report=lambda line: None)


def test_a_different_sweep_in_the_same_folder_is_refused(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"spec": {"grid": {"seed": [9]}}}))
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"seed": [0]})
    with pytest.raises(UserError, match="holds a different sweep"):
        run_sweep(path, out, report=lambda line: None)


def test_ray_executor_on_a_local_ray_instance(tmp_path, tiny_bert, tiny_data, capsys):
    ray = pytest.importorskip("ray", reason="Ray not installed: pip install 'lorafit[ray]'")
    path = _sweep_file(tmp_path, tiny_bert, tiny_data, {"method.rank": [2, 4]})
    out = tmp_path / "sweep"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = run_sweep(path, out, workers=2, executor="ray", report=print)
    finally:
        ray.shutdown()
    assert [r["outcome"] for r in results] == ["ran", "ran"]
    assert all(trial_status(out / r["name"]) == "finished" for r in results)
    assert capsys.readouterr().out.count("accuracy") == 2
