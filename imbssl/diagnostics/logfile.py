"""Writers and readers of a run folder's diagnostics files.

Layout: ``config.yaml`` (resolved Hydra config), ``meta.json``, ``metrics.jsonl`` (one JSON
object per line), ``per_class.csv`` (tidy long format), ``summary.json`` (may be missing for a
run that stopped early) and ``confusion_test.npy``. Readers accept a run that is still being
written: an unterminated last line is ignored and missing files give empty frames or None.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imbssl.diagnostics.metrics import PER_CLASS_COLUMNS
from imbssl.errors import UserError
from imbssl.fileio import atomic_open

METRICS_FILE = "metrics.jsonl"
PER_CLASS_FILE = "per_class.csv"
SUMMARY_FILE = "summary.json"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
CONFUSION_FILE = "confusion_test.npy"
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, META_FILE)


def _plain(value: Any) -> Any:
    """JSON-friendly version of tensors, numpy scalars/arrays and paths."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class RunLog:
    """Appends metrics and per-class rows to a run folder and writes its JSON files."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, row: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once)."""
        line = json.dumps(_plain(row))
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def append_per_class(self, rows: list[dict]) -> None:
        """Append tidy rows to per_class.csv, writing the header when the file is new."""
        if not rows:
            return
        path = self.run_dir / PER_CLASS_FILE
        new = not path.exists() or path.stat().st_size == 0
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=PER_CLASS_COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows({k: _plain(r[k]) for k in PER_CLASS_COLUMNS} for r in rows)
        with open(path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()

    def write_summary(self, summary: dict) -> Path:
        """Atomically (re)write summary.json."""
        return self.write_json(SUMMARY_FILE, summary)

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically (re)write ``name`` in the run folder as indented JSON."""
        path = self.run_dir / name
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(_plain(obj), indent=2) + "\n")
        return path

    def write_confusion(self, confusion: Any, name: str = CONFUSION_FILE) -> Path:
        """Atomically save a confusion matrix as an int64 .npy file."""
        path = self.run_dir / name
        with atomic_open(path) as f:
            np.save(f, np.asarray(_plain(confusion), dtype=np.int64))
        return path


def _complete_text(path: Path) -> str:
    """File text up to its last newline (a partially written last line is dropped)."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[: text.rfind("\n") + 1]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON rows of a JSON-lines file; a line that is not JSON (a write cut short) is
    skipped, and a missing file has none."""
    path, rows = Path(path), []
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    for line in text.splitlines():  # a last line without its newline counts when it parses
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (columns step, split, metrics...). Lines that are not JSON
    (a write cut short) are skipped; a JSON row with a step, split or value of the wrong
    type is damage, a one-line ``UserError`` naming the line."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for number, line in enumerate(_complete_text(path).splitlines(), start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "step" in obj:
            _check_metrics_row(obj, path, number)
            records.append(obj)
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "split": pd.Series(dtype=str)})
    df = pd.DataFrame.from_records(records)
    df["step"] = df["step"].astype("int64")
    if "split" not in df:
        df["split"] = "train"
    df["split"] = df["split"].fillna("train").astype(str)
    if not df.duplicated(["step", "split"]).any():
        return df
    # rows of one (step, split) are merged; a resumed run's re-logged values win
    return df.groupby(["step", "split"], sort=True).last().reset_index()


def _check_metrics_row(row: dict, path: Path, number: int) -> None:
    """An integer step, a string split and numbers (or null) elsewhere, as the trainer writes."""
    def bad(what: str) -> UserError:
        return UserError(f"{path} line {number} is damaged ({what}); repair or delete that line")

    step = row["step"]
    if isinstance(step, bool) or not (isinstance(step, int) or (
            isinstance(step, float) and math.isfinite(step) and step.is_integer())):
        raise bad(f"step {str(step)[:40]!r} is not an integer")
    if not isinstance(row.get("split", ""), str | type(None)):
        raise bad(f"split {str(row['split'])[:40]!r} is not a string")
    for key, value in row.items():
        if key not in ("step", "split") and value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)):
            raise bad(f"{str(key)[:40]!r} is {str(value)[:40]!r}, not a number")


def empty_per_class() -> pd.DataFrame:
    """An empty frame with the per-class columns and dtypes."""
    return _per_class_dtypes(pd.DataFrame({c: [] for c in PER_CLASS_COLUMNS}))


def _per_class_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    """Cast per-class columns to int (step, class), float (value) and str (the rest)."""
    df = df.astype({"step": "int64", "class": "int64", "value": "float64"})
    for col in ("source", "kind", "subset", "class_name", "metric"):
        df[col] = df[col].astype(str)
    return df.reset_index(drop=True)


def read_per_class(run_dir: str | os.PathLike) -> pd.DataFrame:
    """per_class.csv as a DataFrame; incomplete rows are dropped."""
    text = _complete_text(Path(run_dir) / PER_CLASS_FILE)
    if not text.strip():
        return empty_per_class()
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                     on_bad_lines="skip")
    if list(df.columns) != list(PER_CLASS_COLUMNS):
        return empty_per_class()
    for col in ("step", "class", "value"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.dropna(subset=["step", "class", "value"])
    keys = [c for c in PER_CLASS_COLUMNS if c not in ("class_name", "value")]
    return _per_class_dtypes(df.drop_duplicates(keys, keep="last"))


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when missing or unreadable."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_config(run_dir: str | os.PathLike) -> dict:
    """config.yaml as a plain nested dict ({} when missing)."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as exc:  # a tag such as !!python/object (never run) or bad syntax
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"{path} cannot be read as plain YAML ({reason}); the run folder is "
                        f"damaged: restore config.yaml or leave this run out") from None
    return obj if isinstance(obj, dict) else {}


def cfg_get(config: dict, dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``, or ``default`` when any level is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding config.yaml, metrics.jsonl or meta.json."""
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in RUN_MARKERS)


@dataclass
class Run:
    """Everything a run folder holds so far."""

    path: Path
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_class: pd.DataFrame = field(default_factory=empty_per_class)
    summary: dict | None = None
    confusion_test: np.ndarray | None = None

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key."""
        return cfg_get(self.config, dotted, default)

    @property
    def num_classes(self) -> int:
        """Number of classes, from meta.json or the per-class rows."""
        if self.meta.get("class_names"):
            return len(self.meta["class_names"])
        return int(self.per_class["class"].max()) + 1 if len(self.per_class) else 0

    @property
    def class_names(self) -> list[str]:
        """Class names from meta.json, else class indices."""
        names = self.meta.get("class_names") or range(self.num_classes)
        return [str(n) for n in names]

    @property
    def labeled_counts(self) -> list[int] | None:
        """Labeled images per class, from meta.json."""
        counts = self.meta.get("labeled_counts")
        return [int(c) for c in counts] if counts else None

    @property
    def status(self) -> str:
        """summary.json's status, or "incomplete" when there is no summary."""
        return str((self.summary or {}).get("status", "incomplete"))

    @property
    def last_step(self) -> int:
        """Last logged step (summary, else metrics.jsonl), 0 when nothing is logged."""
        if self.summary and "step" in self.summary:
            return int(self.summary["step"])
        return int(self.metrics["step"].max()) if len(self.metrics) else 0

    def split_series(self, split: str, metric: str) -> pd.Series:
        """``metric`` of the ``split`` rows indexed by step (NaN rows dropped)."""
        df = self.metrics
        if metric not in df or "split" not in df:
            return pd.Series(dtype=float)
        rows = df[df["split"] == split]
        return rows.set_index("step")[metric].dropna().astype(float)

    def final_metrics(self) -> dict[str, float]:
        """summary.json's "final" entries, else the last logged test/valid accuracies."""
        if self.summary and self.summary.get("final"):
            return {k: float(v) for k, v in self.summary["final"].items() if finite(v)}
        out = {}
        for split in ("test", "valid"):
            for metric in ("top1", "balanced_acc"):
                s = self.split_series(split, metric)
                if len(s):
                    out[f"{split}/{metric}"] = float(s.iloc[-1])
        return out

    def median_last(self, metric: str = "test/top1", n: int = 20) -> float:
        """DASO protocol summary of ``metric`` ("split/name"): the median of its last ``n``
        logged values; NaN with fewer than ``n`` (see ``summary_stats.median_last``)."""
        from imbssl.diagnostics.summary_stats import median_last

        split, _, name = metric.partition("/")
        return median_last(self.split_series(split, name).tolist(), n)

    def num_evals(self, split: str = "test") -> int:
        """How many evaluations of ``split`` are logged."""
        return len(self.split_series(split, "top1"))


def _read_confusion(path: Path) -> np.ndarray | None:
    """confusion_test.npy, or None when missing or unreadable."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, or being written
        return None


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder (finished, running or stopped early)."""
    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"not a folder: {p}")
    return Run(path=p, config=read_config(p), meta=_read_json(p / META_FILE) or {},
               metrics=read_metrics(p), per_class=read_per_class(p),
               summary=_read_json(p / SUMMARY_FILE),
               confusion_test=_read_confusion(p / CONFUSION_FILE))


def finite(value: Any) -> bool:
    """True for a real, finite number."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def short_value(value: Any) -> str:
    """A config value for display: 100.0 -> "100", everything else as str."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
