"""bench/label_audit.py, the near-paraphrase audit behind the README's "what bounds it": nearest neighbours by
cosine, conflicts counted per threshold, each run's predictions on them, and the errors every run makes, on
vectors and labels whose answers are known by construction."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import label_audit as la  # noqa: E402  (bench/ is not a package)

from conftest import tiny_overrides, write_dataset  # noqa: E402


def test_nearest_is_by_cosine_and_can_leave_a_row_out_of_its_own_neighbours():
    reference = np.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    queries = np.array([[2.0, 0.1], [0.1, 1.0], [5.0, 5.0]])  # scale does not matter, direction does
    index, similarity = la.nearest(reference, queries, chunk=2)  # two chunks
    assert index.tolist() == [0, 1, 2]
    assert similarity[2] == pytest.approx(1.0) and similarity[0] == pytest.approx(2 / np.hypot(2, 0.1))
    index, similarity = la.nearest(reference, reference, exclude_self=True, chunk=1)
    assert index.tolist() == [2, 2, 0]  # (1, 1) is nearest to both axes; for it the two axes tie, and the first wins
    assert similarity[0] == pytest.approx(np.sqrt(0.5))


def test_conflicts_and_what_each_run_predicts_on_them_are_counted_per_threshold():
    reference_labels = ["a", "b", "c"]
    index = np.array([0, 1, 2, 0, 1])
    similarity = np.array([0.99, 0.96, 0.99, 0.5, 0.97])
    targets = ["a", "a", "b", "b", "b"]  # query 0 agrees with its neighbour; 1 and 2 conflict; 3 is far; 4 agrees
    run = ["a", "b", "a", "b", "b"]  # on the conflicts: query 1 -> the neighbour's label, query 2 -> neither
    result = la.audit(index, similarity, reference_labels, targets, {"r": run}, [0.98, 0.95])
    assert (result[0.98]["close"], result[0.98]["conflicts"]) == (2, 1)
    assert (result[0.95]["close"], result[0.95]["conflicts"]) == (4, 2)
    assert result[0.95]["indices"] == [2, 1] and result[0.98]["indices"] == [2]  # most similar first
    r = result[0.95]["runs"]["r"]
    assert (r["test_label"], r["neighbour_label"], r["other"]) == (0, 1, 1)
    assert r["accuracy"] == pytest.approx(3 / 5) and r["accuracy_without_conflicts"] == pytest.approx(1.0)
    r = result[0.98]["runs"]["r"]  # only query 2 conflicts at 0.98
    assert (r["test_label"], r["neighbour_label"], r["other"]) == (0, 0, 1)
    assert r["accuracy_without_conflicts"] == pytest.approx(3 / 4)


def test_common_errors_are_the_queries_every_run_misses_with_their_commonest_guess():
    targets = ["a", "b", "c", "d"]
    runs = {"r1": ["a", "c", "a", "a"], "r2": ["b", "c", "b", "d"], "r3": ["a", "a", "b", "a"]}
    assert la.common_errors(targets, runs) == [(1, "c"), (2, "b")]


def test_the_script_finds_a_verbatim_conflict_in_a_real_run_and_refuses_another_test_split(tiny_bert, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from lorafit.config import load_config
    from lorafit.train import train

    import emotion_words

    data = write_dataset(tmp_path / "data", n_train=80, n_test=20)
    train_rows, test_rows = pd.read_csv(data / "train.csv"), pd.read_csv(data / "test.csv")
    other = next(label for label in sorted(set(train_rows.label)) if label != train_rows.label[0])
    test_rows.loc[0] = [train_rows.text[0], other]  # training's first text, under another label
    test_rows.to_csv(data / "test.csv", index=False)
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_bert, data, **{"train.epochs": 1})), run)

    monkeypatch.setattr(sys, "argv", ["label_audit.py", str(run), "--thresholds", "0.999", "0.95"])
    assert la.main() == 0
    out = capsys.readouterr().out
    assert f"{other}: {train_rows.text[0]}  ||  {train_rows.label[0]}: {train_rows.text[0]}" in out
    row = next(line for line in out.splitlines() if line.startswith("| 0.999 |"))
    assert int(row.split("**")[1]) >= 1  # at least the planted conflict
    monkeypatch.setattr(sys, "argv", ["emotion_words.py", str(run)])
    assert emotion_words.main() == 0  # no "feel" here: every tweet in "other", and the script says so without failing
    assert "| other | 20 |" in capsys.readouterr().out

    elsewhere = write_dataset(tmp_path / "other-data", n_train=80, n_test=25, seed=5)
    stranger = tmp_path / "stranger"
    train(load_config(None, tiny_overrides(tiny_bert, elsewhere, **{"train.epochs": 1})), stranger)
    monkeypatch.setattr(sys, "argv", ["label_audit.py", str(run), str(stranger)])
    with pytest.raises(SystemExit) as exit_:
        la.main()
    assert exit_.value.code == 2 and "is not this test split" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["label_audit.py", "emotion_words.py"])
def test_a_missing_run_is_one_line_and_exit_2(script, tmp_path):
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench"
    done = subprocess.run([sys.executable, str(bench / script), str(tmp_path / "no-such-run")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"{bench / script}: error: run folder not found: {tmp_path / 'no-such-run'}"]
