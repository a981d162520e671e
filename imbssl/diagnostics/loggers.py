"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (``logger=...``).

``open_run_log(run_dir, cfg)`` is the trainer's :class:`RunLog`; with ``logger=wandb`` or
``logger=mlflow`` it is a :class:`TrackedRunLog` that sends every write to the tracker too:

* the resolved config once, when the run starts (W&B config; MLflow params + config.yaml);
* every ``metrics.jsonl`` row as scalars named ``<split>/<metric>`` at its step;
* the per-class rows: W&B gets one ``per_class`` table per evaluation; MLflow gets
  ``per_class.csv`` as an artifact when the run ends (MLflow tables are artifacts);
* the final ``summary.json``; a summary with a status other than "running" ends the tracker's
  run (finished, stopped or failed).

W&B runs offline by default (files in ``RUN/wandb/``, upload later with ``wandb sync``);
MLflow writes to ``sqlite:///RUN/mlflow.db`` unless ``logger.tracking_uri`` names another
store. The tracker's run id is kept in ``RUN/tracking.json`` so ``resume=true`` continues it.
"""
from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from imbssl.diagnostics.logfile import CONFIG_FILE, PER_CLASS_FILE, RunLog, _plain
from imbssl.errors import UserError
from imbssl.typed_config import typed

TRACKERS = ("none", "wandb", "mlflow")
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> pip extra (and package)
IDS_FILE = "tracking.json"
MLFLOW_BATCH = 100  # MLflow's limit of params per log_batch call


@dataclass
class LoggerConfig:
    """Experiment tracker beside TensorBoard (``logger=...``)."""

    name: str = "none"  # none | wandb | mlflow
    project: str = "imbssl"  # W&B project / MLflow experiment
    run_name: str = ""  # "" = the run folder's name
    mode: str = "offline"  # W&B: offline (files in the run folder, `wandb sync` later) | online
    tracking_uri: str = ""  # MLflow: "" = sqlite:///<run_dir>/mlflow.db; or file:/..., sqlite:///..


def check_logger(cfg: Any) -> Any:
    """``cfg.logger`` as a LoggerConfig; an unknown tracker or a missing package is a
    one-line ``UserError`` naming the pip extra."""
    lcfg = typed(cfg, "logger", LoggerConfig) if _has_logger(cfg) else LoggerConfig()
    if lcfg.name not in TRACKERS:
        raise UserError(f"logger={lcfg.name!r} is not a tracker; use one of "
                        f"{', '.join(TRACKERS)}")
    if lcfg.name == "wandb" and lcfg.mode not in ("offline", "online"):
        raise UserError(f"logger.mode={lcfg.mode!r}: use offline or online")
    if lcfg.name in EXTRAS:
        _import(lcfg.name)
    return lcfg


def _has_logger(cfg: Any) -> bool:
    """True when the config has a logger group (run folders older than it have none)."""
    return (cfg.get("logger") if hasattr(cfg, "get") else getattr(cfg, "logger", None)) \
        is not None


def _import(name: str):
    """Import a tracker package; a missing one is a UserError naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"logger={name} needs the {name} package: "
                        f"pip install 'imbssl[{EXTRAS[name]}]'") from None


def open_run_log(run_dir: str | os.PathLike, cfg: Any) -> RunLog:
    """The run folder's log; it also feeds the tracker chosen by ``logger=...``."""
    lcfg = check_logger(cfg)
    if lcfg.name == "none":
        return RunLog(run_dir)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    make = WandbTracker if lcfg.name == "wandb" else MlflowTracker
    return TrackedRunLog(run_dir, make(Path(run_dir), lcfg, dict(config)))


class TrackedRunLog(RunLog):
    """A RunLog whose metrics, per-class rows and final summary also go to a tracker."""

    def __init__(self, run_dir: str | os.PathLike, tracker: Tracker):
        super().__init__(run_dir)
        self.tracker = tracker
        self._pending: list[dict] = []  # per-class rows of the evaluation being logged

    def append_metrics(self, row: dict) -> None:
        super().append_metrics(row)
        self.tracker.log_scalars(int(row["step"]), scalar_items(row))

    def append_per_class(self, rows: list[dict]) -> None:
        super().append_per_class(rows)
        if self._pending and rows and rows[0]["step"] != self._pending[0]["step"]:
            self._flush_per_class()
        self._pending += rows

    def _flush_per_class(self) -> None:
        """One per-class table per evaluation (the trainer appends it in several parts)."""
        if self._pending:
            self.tracker.log_per_class(int(self._pending[0]["step"]), self._pending)
            self._pending = []

    def write_summary(self, summary: dict) -> Path:
        path = super().write_summary(summary)
        self._flush_per_class()  # the trainer writes a summary at the end of each evaluation
        status = str(summary.get("status", "running"))
        if status != "running":
            self.tracker.finish(_plain(summary), status)
        return path


def scalar_items(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's numbers keyed ``<split>/<metric>`` (step and split dropped;
    keys that already start with the split, like ``pseudo/final/...``, are kept)."""
    split = str(row.get("split", "train"))
    return {k if k.startswith(f"{split}/") else f"{split}/{k}": float(v)
            for k, v in _plain(row).items()
            if k not in ("step", "split") and isinstance(v, int | float)
            and not isinstance(v, bool)}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value} (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _read_ids(run_dir: Path) -> dict:
    """Tracker run ids kept from an earlier start of this run (resume)."""
    try:
        return json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_ids(run_dir: Path, **ids: str) -> None:
    """Remember tracker run ids, so ``resume=true`` continues the same tracker run."""
    RunLog(run_dir).write_json(IDS_FILE, {**_read_ids(run_dir), **ids})


class Tracker:
    """What a tracker does with a run's logs."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_per_class(self, step: int, rows: list[dict]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict, status: str) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """Weights & Biases run in ``RUN/wandb/`` (offline by default)."""

    def __init__(self, run_dir: Path, lcfg: Any, config: dict):
        wandb = _import("wandb")
        self.wandb = wandb
        run_id = _read_ids(run_dir).get("wandb") or uuid.uuid4().hex[:8]
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                  disable_git=True, x_save_requirements=False)
        self.run = wandb.init(project=lcfg.project, name=lcfg.run_name or run_dir.name,
                              dir=str(run_dir), mode=lcfg.mode, config=config, id=run_id,
                              resume="allow", settings=settings)
        _write_ids(run_dir, wandb=run_id)
        self.finished = False

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if scalars:
            self.run.log(scalars, step=step)

    def log_per_class(self, step: int, rows: list[dict]) -> None:
        table = self.wandb.Table(dataframe=per_class_frame(rows))
        self.run.log({"per_class": table}, step=step)

    def finish(self, summary: dict, status: str) -> None:
        if self.finished:
            return
        for key, value in flatten(summary).items():
            if not isinstance(value, list):
                self.run.summary[key] = value
        self.run.finish(exit_code=0 if status == "finished" else 1)
        self.wandb.teardown()  # waits until the run's records are on disk
        self.finished = True


class MlflowTracker(Tracker):
    """MLflow run in a local sqlite (default: ``RUN/mlflow.db``) or file store."""

    def __init__(self, run_dir: Path, lcfg: Any, config: dict):
        _import("mlflow")
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        uri = lcfg.tracking_uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = _read_ids(run_dir).get("mlflow")
        if run_id is None:
            run_id = self._create_run(lcfg, run_dir, config, not lcfg.tracking_uri)
        self.run_id = run_id
        _write_ids(run_dir, mlflow=run_id, mlflow_tracking_uri=uri)
        self.finished = False

    def _create_run(self, lcfg: Any, run_dir: Path, config: dict, own_store: bool) -> str:
        """A new run in the experiment (created on first use) with the config as params."""
        exp = self.client.get_experiment_by_name(lcfg.project)
        if exp is None:
            where = (run_dir.resolve() / "mlartifacts").as_uri() if own_store else None
            exp_id = self.client.create_experiment(lcfg.project, artifact_location=where)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=lcfg.run_name or run_dir.name)
        self._log_params(run.info.run_id, flatten(config))
        self.client.log_dict(run.info.run_id, config, CONFIG_FILE)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH])

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH * 10):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MLFLOW_BATCH * 10])

    def log_per_class(self, step: int, rows: list[dict]) -> None:
        """Nothing per evaluation: per_class.csv is logged whole when the run ends."""

    def finish(self, summary: dict, status: str) -> None:
        if self.finished:
            return
        if (self.run_dir / PER_CLASS_FILE).is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / PER_CLASS_FILE))
        self.client.log_dict(self.run_id, summary, "summary.json")
        state = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self.client.set_terminated(self.run_id, status=state)
        self.finished = True


def per_class_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Per-class rows as a DataFrame in the per_class.csv column order."""
    from imbssl.diagnostics.metrics import PER_CLASS_COLUMNS

    return pd.DataFrame([{k: _plain(r[k]) for k in PER_CLASS_COLUMNS} for r in rows],
                        columns=list(PER_CLASS_COLUMNS))
