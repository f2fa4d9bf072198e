"""Knowledge distillation (distill.teacher): the loss against Hinton et al.'s formula, the teacher's logits
the run keeps (its own predictions on the training texts, in the run's label order), the loop's gradient,
a resume that needs no teacher, and the teachers refused before any work."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.numpy import load_file, save_file

import lorafit
from lorafit import batching, data
from lorafit.config import DistillConfig, TrainConfig, load_config
from lorafit.distill import TEACHER_FILE, distillation_losses
from lorafit.errors import UserError
from lorafit.posthoc import refit
from lorafit.push import files_to_push
from lorafit.train import resume, sum_training_loss, train

from conftest import assert_same_adapter_run, crash_after_step, tiny_overrides, train_fails_cleanly

WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.5])


def _logits(n: int = 19, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, generator=g) * 2, torch.randn(n, classes, generator=g) * 3,
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_term_is_t_squared_kl_of_softened_distributions(temperature):
    student, teacher, _ = _logits()
    got = distillation_losses(student, teacher, temperature)
    expected = temperature ** 2 * F.kl_div(F.log_softmax(student.double() / temperature, -1),
                                           F.log_softmax(teacher.double() / temperature, -1),
                                           log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert distillation_losses(teacher, teacher, temperature).abs().max() < 1e-6  # a student equal to its teacher: 0


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss,weights", [("ce", None), ("focal", WEIGHTS)])
def test_loss_mixes_labels_and_teacher_by_alpha(alpha, loss, weights):
    """Per example w_y * [(1 - alpha) * training loss + alpha * T^2 KL]: alpha 0 is the plain loss."""
    student, teacher, y = _logits()
    train_cfg, cfg = TrainConfig(loss=loss, label_smoothing=0.1), DistillConfig(teacher="t", alpha=alpha, temperature=3.0)
    got = sum_training_loss(student, y, train_cfg, weights, teacher, cfg)
    plain = torch.stack([sum_training_loss(student[i:i + 1], y[i:i + 1], train_cfg, None) for i in range(len(y))]).double()
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights.double()[y]
    expected = (w * ((1 - alpha) * plain + alpha * distillation_losses(student, teacher, 3.0).double())).sum()
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture
def teacher(tiny_models, tiny_data, tmp_path):
    """A RoBERTa LoRA run on the student's data and seed: distillation crosses architectures and tokenizers."""
    out = tmp_path / "teacher"
    train(load_config(None, tiny_overrides(tiny_models["roberta"], tiny_data, **{"train.epochs": 3})), out)
    return out


def _student(tiny_bert, tiny_data, teacher, **extra):
    return tiny_overrides(tiny_bert, tiny_data, **{"distill.teacher": str(teacher), "distill.alpha": 0.7,
                                                    "distill.temperature": 2.0, **extra})


def test_run_keeps_the_teachers_predictions_on_its_training_texts(tiny_bert, tiny_data, teacher, tmp_path):
    cfg = load_config(None, _student(tiny_bert, tiny_data, teacher))
    run = train(cfg, tmp_path / "student").path
    kept = load_file(str(run / TEACHER_FILE))["logits"]
    dataset, _ = data.load(cfg.data, cfg.seed)
    texts = dataset.splits["train"].texts
    model = lorafit.load(teacher, out_of_scope=False)
    order = [model.labels.index(name) for name in json.loads((run / "labels.json").read_text())]
    np.testing.assert_allclose(kept, model.logits(texts)[:, order], atol=1e-5)
    assert kept.shape == (len(texts), 3) and kept.std() > 0.01  # a trained teacher's logits, not zeros
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]["distill"]
    assert derived["teacher"] == str(teacher.resolve()) and len(derived["logits_sha256"]) == 64
    assert f"| regularisation | distilled from `{teacher}` (alpha 0.7, temperature 2.0) |" in (run / "README.md").read_text()


def test_a_step_learns_from_the_teachers_logits(tiny_bert, tiny_data, teacher, tmp_path):
    """train._forward_backward leaves the gradient of the mixed loss over the batch, with the logits the
    job holds for exactly these examples (replayed from the same random state)."""
    from lorafit.job import prepare
    from lorafit.rundir import RunDir

    train_module = importlib.import_module("lorafit.train")
    job = prepare(load_config(None, _student(tiny_bert, tiny_data, teacher, **{"train.max_batch_tokens": "null"})),
                  RunDir(tmp_path / "run"))
    job.model.train()
    lengths = [len(t) for t in job.tokens["train"]]
    batch = [5, 17, 2, 40, 33, 8, 61]
    torch.manual_seed(7)
    loss, _ = train_module._forward_backward(job, [batch], 0, lengths, boundary=True)
    got = {name: p.grad.clone() for name, p in job.model.named_parameters() if p.grad is not None}

    job.model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    input_ids, attention_mask = batching.collate([job.tokens["train"][j] for j in batch], job.pad_id)
    logits = job.forward(input_ids, attention_mask).float()
    y = torch.as_tensor(job.targets["train"][batch])
    teacher_logits = job.teacher[batch]
    assert float(teacher_logits.std()) > 0.01
    ce = F.cross_entropy(logits, y, reduction="none")
    expected = (0.3 * ce + 0.7 * distillation_losses(logits, teacher_logits, 2.0)).sum()
    (expected / len(batch)).backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    for name, p in job.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_resume_needs_no_teacher_and_ends_bit_for_bit(tiny_bert, tiny_data, teacher, tmp_path, monkeypatch):
    overrides = _student(tiny_bert, tiny_data, teacher, **{"method.dropout": 0.1, "train.checkpoint_every": 6})
    reference = train(load_config(None, overrides), tmp_path / "reference")
    crash_after_step(overrides, tmp_path / "killed", monkeypatch, step=reference.summary["steps"] - 3)
    shutil.rmtree(teacher)  # the saved logits are all a resume reads
    saved = tmp_path / "killed" / TEACHER_FILE
    original = saved.read_bytes()
    edited = load_file(str(saved))
    edited["logits"][3, 1] += 1.0
    save_file(edited, str(saved))
    with pytest.raises(UserError, match=r"teacher_logits.safetensors is not the file this run saved"):
        resume(tmp_path / "killed")
    saved.write_bytes(original)
    resume(tmp_path / "killed")
    assert_same_adapter_run(reference.path, tmp_path / "killed")
    # what nothing trains from needs no teacher: a post-hoc refit, a push (which leaves the teacher's logits out)
    saved.unlink()
    refit(tmp_path / "killed")
    assert TEACHER_FILE not in files_to_push(reference.path) and "config.yaml" in files_to_push(reference.path)


def test_teacher_columns_follow_this_runs_label_order(tiny_bert, tiny_data, teacher, tmp_path, monkeypatch):
    """A teacher whose label order differs (another data file's order): its logits' columns are put in this
    run's order by name. The teacher's load is stubbed to return known logits under reversed labels."""
    from lorafit import distill, inference
    from lorafit.distributed import World
    from lorafit.rundir import RunDir

    cfg = load_config(None, _student(tiny_bert, tiny_data, teacher))
    dataset, _ = data.load(cfg.data, cfg.seed)
    names = dataset.label_names
    n = len(dataset.splits["train"])
    known = np.arange(n * 3, dtype=np.float32).reshape(n, 3)  # column j: the teacher's label names[::-1][j]

    class Stub:
        labels = names[::-1]

        def logits(self, texts):
            assert texts == dataset.splits["train"].texts
            return known

    real_plan = inference.plan_load
    monkeypatch.setattr(inference, "plan_load", lambda path: dataclasses.replace(real_plan(path), labels=names[::-1]))
    monkeypatch.setattr(inference, "load", lambda plan, **kw: Stub())
    got = distill.teacher_logits(cfg.distill, dataset, RunDir(tmp_path / "x"), "compute", World(), torch.device("cpu"))
    np.testing.assert_array_equal(got, known[:, ::-1])


def test_students_of_per_seed_teachers_compare_as_one_configuration(tiny_bert, tiny_data, tmp_path):
    """Each seed's student learns from its own seed's teacher (paths differ by seed=N): lorafit compare
    reads the teacher as its configuration, so the students form one group of two seeds."""
    from lorafit import compare

    teachers, students = [], []
    for seed in (0, 1):
        teachers.append(train(load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 1, "seed": seed})),
                              tmp_path / "teacher" / f"seed={seed}").path)
        students.append(train(load_config(None, _student(tiny_bert, tiny_data, teachers[-1], **{"train.epochs": 1, "seed": seed})),
                              tmp_path / "student" / f"seed={seed}").path)
    result = compare.compare(compare.collect([*students, *teachers]))
    assert sorted(sorted(row["runs"]) for row in result["rows"]) == sorted(sorted(str(r) for r in group) for group in (students, teachers))


# -- teachers refused: one line, exit 2, nothing written -------------------------------------------

def test_a_teacher_that_trained_on_this_runs_validation_is_refused(tiny_bert, tiny_data, tmp_path, capsys):
    """Validation is carved from train by the seed: a teacher of another seed trained on some of it."""
    teacher = train(load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 1, "seed": 1})),
                    tmp_path / "teacher-seed1").path
    line = train_fails_cleanly(capsys, tmp_path / "student", _student(tiny_bert, tiny_data, teacher))
    assert f"distill.teacher {teacher} trained on " in line and " of this run's 12 validation examples (it was trained with another seed" in line, line


def test_a_soup_teacher_is_checked_through_every_run_in_it(tiny_bert, tiny_data, tmp_path, capsys):
    """A soup of seeds 0 and 1 teaching a seed-0 student: seed 1's run trained on seed 0's validation rows."""
    from lorafit.soup import soup

    runs = [train(load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 1, "seed": seed})),
                  tmp_path / f"seed={seed}").path for seed in (0, 1)]
    soup(runs, tmp_path / "soup")
    line = train_fails_cleanly(capsys, tmp_path / "student", _student(tiny_bert, tiny_data, tmp_path / "soup"))
    assert f"distill.teacher {tmp_path / 'soup'} trained on " in line and " validation examples" in line, line


def test_a_full_data_teacher_is_refused_for_a_few_shot_run(tiny_bert, tiny_data, tmp_path, capsys):
    """A few-shot run's validation is drawn from the rest of train, which a full-data teacher trained on."""
    teacher = train(load_config(None, tiny_overrides(tiny_bert, tiny_data, **{"train.epochs": 1})), tmp_path / "teacher").path
    line = train_fails_cleanly(capsys, tmp_path / "student", _student(tiny_bert, tiny_data, teacher, **{"data.shots_per_class": 4}))
    assert f"distill.teacher {teacher} trained on " in line and " validation examples" in line, line


def test_a_teacher_with_other_labels_or_no_folder_is_refused(tiny_bert, tiny_data, tmp_path, capsys):
    other = tmp_path / "other-data"
    other.mkdir()
    for split in ("train", "test"):
        frame = __import__("pandas").read_csv(tiny_data / f"{split}.csv")
        frame["label"] = frame["label"].replace({"sport": "football"})
        frame.to_csv(other / f"{split}.csv", index=False)
    teacher = train(load_config(None, tiny_overrides(tiny_bert, other, **{"train.epochs": 1})), tmp_path / "teacher").path
    line = train_fails_cleanly(capsys, tmp_path / "student", _student(tiny_bert, tiny_data, teacher))
    assert f"distill.teacher {teacher}: its labels are not this data's: it lacks 'sport' and has 'football' too; give a " in line, line
    line = train_fails_cleanly(capsys, tmp_path / "student", _student(tiny_bert, tiny_data, tmp_path / "nowhere"))
    assert line.startswith("lorafit: error: distill.teacher: ") and "nowhere" in line, line
