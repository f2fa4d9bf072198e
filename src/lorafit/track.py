"""Experiment trackers as sinks: each receives what `metrics.jsonl` gets (which is always written).

    track: {sinks: [tensorboard, mlflow, wandb]}

- tensorboard: event files in `RUN_DIR/tensorboard/`.
- mlflow: a run in `track.mlflow_uri` (default `$MLFLOW_TRACKING_URI`, else a file store `./mlruns`),
  experiment `track.project`; params are the flattened config.
- wandb: offline by default (run files under `RUN_DIR/wandb/`, `wandb sync` uploads them later);
  `track.wandb_mode: online` needs a login. wandb's own service process closes a run's files just after
  the run ends: they are complete once the Python process exits or `wandb.teardown()` returns.

Each sink logs the hyperparameters (the whole config, method settings included), every step and
epoch record, and at the end the test metrics and efficiency figures. A resumed run continues the
same tracker runs (their ids are kept in `RUN_DIR/track.json`); TensorBoard discards what the
killed process logged after the checkpoint. The packages are optional extras (`lorafit[track]`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from . import atomic
from .errors import UserError
from .rundir import Summary

__all__ = ["open_sinks", "Sinks", "flatten"]

log = logging.getLogger(__name__)

#: metrics.jsonl record fields -> tracker metric names, per record type.
_NAMES = {
    "step": {"loss": "train/loss", "lr": "train/lr", "examples_per_second": "train/examples_per_second"},
    "epoch": {"train_loss": "epoch/train_loss", "val_loss": "val/loss", "val_accuracy": "val/accuracy",
              "val_macro_f1": "val/macro_f1", "seconds": "epoch/seconds", "examples_per_second": "epoch/examples_per_second",
              "epoch": "epoch"},
    "contrastive_step": {"loss": "contrastive/loss", "lr": "train/lr"},
    "contrastive_epoch": {"train_loss": "contrastive/epoch_loss", "val_centroid_accuracy": "contrastive/val_centroid_accuracy",
                          "seconds": "epoch/seconds"},
}
_FINAL = ("accuracy", "macro_f1", "weighted_f1", "loss")
#: Summary fields that go to the trackers as efficiency/<name> at the end.
_EFFICIENCY = ("trainable_params", "total_params", "trainable_percent", "adapter_bytes", "train_seconds",
               "seconds_per_epoch", "train_examples_per_second", "peak_memory_mb", "best_epoch")


def flatten(tree: dict) -> dict[str, Any]:
    """`{"method": {"rank": 8}}` -> `{"method.rank": 8}`: sections only; a dict-valued setting (a
    LoRA rank_pattern, whose keys are regexes) stays one parameter, written as JSON."""
    out = {}
    for section, value in tree.items():
        if isinstance(value, dict):
            for key, setting in value.items():
                out[f"{section}.{key}"] = json.dumps(setting) if isinstance(setting, (dict, list)) else setting
        else:
            out[section] = value
    return out


def _metrics(record: dict) -> dict[str, float]:
    names = _NAMES.get(record.get("type"), {})
    return {names[k]: float(v) for k, v in record.items() if k in names and isinstance(v, (int, float))}


class _TensorBoard:
    def __init__(self, run_path: Path, params: dict, state: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        logdir = run_path / "tensorboard"
        if resume_step is not None:
            # Event files are read in name order, and names start with the creation second: a resumed
            # writer's file must sort after the killed one's, or its purge marker is read first.
            newest = max((int(f.name.split(".")[3]) for f in logdir.glob("events.out.tfevents.*")
                          if f.name.split(".")[3].isdigit()), default=0)
            while int(time.time()) <= newest:
                time.sleep(0.05)
        # On resume, events at or after the checkpoint's next step (logged before the kill) are dropped.
        self.writer = SummaryWriter(str(run_path / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, params: dict, final: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        for name, value in final.items():
            self.writer.add_scalar(name, value, step)
        # The hyperparameter table: TensorBoard's HPARAMS plugin (scalars, strings and bools only).
        shown = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        for event in hparams(shown, {k: v for k, v in final.items() if k.startswith("test/")}):
            self.writer.file_writer.add_summary(event)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_path: Path, params: dict, state: dict, project: str, uri: str | None):
        import os

        from mlflow.tracking import MlflowClient

        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if state.get("mlflow_run_id"):
            self.run_id = state["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = self._experiment(project)
            run = self.client.create_run(experiment_id, run_name=run_path.name, tags={"lorafit.run_dir": str(run_path.resolve())})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        state["mlflow_run_id"] = self.run_id
        state["mlflow_uri"] = uri

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another trial of a sweep created it a moment ago
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, params: dict, final: dict[str, float], step: int) -> None:
        self.log(final, step)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


class _WandB:
    def __init__(self, run_path: Path, params: dict, state: dict, project: str, mode: str):
        import wandb

        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self.run = wandb.init(project=project, dir=str(run_path), mode=mode, name=run_path.name, config=params,
                              id=state.get("wandb_id"), resume="allow", settings=settings, reinit="create_new")
        state["wandb_id"] = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, params: dict, final: dict[str, float], step: int) -> None:
        self.run.summary.update(final)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Sinks:
    """The trackers a run writes to; does nothing when `track.sinks` is empty."""

    def __init__(self, sinks: list, params: dict):
        self.sinks = sinks
        self.params = params
        self.last_step = 0

    def log(self, record: dict) -> None:
        metrics = _metrics(record)
        self.last_step = int(record.get("step", self.last_step))
        self._each("log", metrics, self.last_step)

    def finish(self, test: dict, summary: Summary, step: int) -> None:
        final = {f"test/{k}": float(test[k]) for k in _FINAL if k in test}
        figures = {name: getattr(summary, name) for name in _EFFICIENCY}
        final |= {f"efficiency/{k}": float(v) for k, v in figures.items() if isinstance(v, (int, float))}
        self._each("finish", self.params, final, step)

    def flush(self) -> None:
        """Before each checkpoint: what was logged up to it must survive a kill (a resume starts there)."""
        self._each("flush")

    def close(self, ok: bool) -> None:
        self._each("close", ok)

    def _each(self, call: str, *args) -> None:
        """A tracker that fails is reported and dropped: it must not stop (or hide) the training run."""
        for sink in list(self.sinks):
            if not hasattr(sink, call):  # MLflow logs synchronously, W&B through its own service: no flush
                continue
            try:
                getattr(sink, call)(*args)
            except Exception as e:
                log.warning("the %s tracker failed (%s) and is off for the rest of this run: %s",
                            type(sink).__name__.strip("_"), call, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                self.sinks.remove(sink)


def open_sinks(cfg, run_path: Path, resume_step: int | None = None) -> Sinks:
    """The configured trackers, opened (or, when resuming, reopened) for the run in `run_path`."""
    names = list(cfg.track.sinks)
    params = flatten(cfg.model_dump(mode="json"))
    if not names:
        return Sinks([], params)
    state_path = run_path / "track.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    opened = []
    for name in names:
        try:
            if name == "tensorboard":
                opened.append(_TensorBoard(run_path, params, state, resume_step))
            elif name == "mlflow":
                opened.append(_MLflow(run_path, params, state, cfg.track.project, cfg.track.mlflow_uri))
            elif name == "wandb":
                opened.append(_WandB(run_path, params, state, cfg.track.project, cfg.track.wandb_mode))
        except ImportError as e:
            Sinks(opened, params).close(False)
            raise UserError(f"track.sinks has {name}, whose package is missing ({e.name}): pip install 'lorafit[track]'") from None
        except Exception as e:
            Sinks(opened, params).close(False)
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"cannot start the {name} tracker: {first}; fix track.* or leave {name} out of track.sinks") from None
    atomic.write_text(state_path, json.dumps(state, indent=2) + "\n")  # --resume reopens the same tracker runs
    return Sinks(opened, params)
