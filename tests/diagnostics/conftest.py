"""Synthetic run folders, written the way the trainer writes them."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imbssl.diagnostics.logfile import RunLog
from imbssl.diagnostics.metrics import (
    classification_metrics,
    median_of_last,
    per_class_rows,
)
from imbssl.diagnostics.tracker import PseudoLabelTracker, refiner_rows
from imbssl.pseudo.daso import DASO

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def lt_counts(n1: int, gamma: float, num_classes: int) -> list[int]:
    """Long-tailed counts n1 * gamma^(-k/(K-1))."""
    return [int(n1 * gamma ** (-k / (num_classes - 1))) for k in range(num_classes)]


def _biased_predictions(rng, y, recall, head_prior):
    """Correct with per-class probability ``recall``, otherwise drawn from ``head_prior``."""
    wrong = rng.choice(len(head_prior), size=len(y), p=head_prior)
    return np.where(rng.random(len(y)) < recall[y], y, wrong)


def write_synthetic_run(run_dir: Path, *, algorithm: str = "fixmatch", pseudo: str = "none",
                        gamma_l: float = 100, gamma_u: float | None = None, n1: int = 1500,
                        m1: int = 3000, seed: int = 0, iterations: int = 1000,
                        eval_every: int = 100, stop_at: int | None = None,
                        num_classes: int = 10, test_per_class: int = 50) -> Path:
    """A run folder with config, meta, metrics, per-class rows, confusion and summary."""
    gamma_u = gamma_l if gamma_u is None else gamma_u
    key = f"{algorithm}/{pseudo}/{gamma_l}/{gamma_u}/{seed}"
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"seed": seed, "algorithm": {"name": algorithm}, "pseudo": {"name": pseudo},
              "dataset": {"name": "cifar10_lt", "n1": n1, "m1": m1, "gamma_l": gamma_l,
                          "gamma_u": gamma_u, "reverse_unlabeled": False},
              "trainer": {"iterations": iterations, "eval_every": eval_every}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    labeled = lt_counts(n1, gamma_l, num_classes)
    unlabeled = lt_counts(m1, gamma_u, num_classes)
    names = CIFAR10[:num_classes] if num_classes <= 10 else [f"c{i}" for i in range(num_classes)]
    log = RunLog(run_dir)
    log.write_json("meta.json", {"git_commit": "abc123", "seed": seed, "class_names": names,
                                 "labeled_counts": labeled, "unlabeled_counts": unlabeled,
                                 "imbssl_version": "0.1.0", "torch": torch.__version__,
                                 "device": "cpu", "start_time": "2024-01-01T00:00:00"})
    prior = np.asarray(labeled, dtype=float) / sum(labeled)
    tail = np.linspace(0, 1, num_classes)
    bonus = 0.12 if pseudo == "daso" else 0.0
    y_test = np.repeat(np.arange(num_classes), test_per_class)
    y_ulb = rng.choice(num_classes, size=400, p=np.asarray(unlabeled) / sum(unlabeled))
    tracker = PseudoLabelTracker(num_classes, "cpu")
    daso = DASO(num_classes, 4, queue_size=4, dist_temperature=1.5) if pseudo == "daso" else None
    last = iterations if stop_at is None else stop_at
    top1s = []
    for step in range(eval_every, last + 1, eval_every):
        progress = step / iterations
        recall = np.clip(0.55 + 0.35 * progress - (0.5 - bonus) * tail
                         + rng.normal(0, 0.03, num_classes), 0.02, 0.99)
        log.append_metrics({"step": step, "split": "train", "loss/total": 2.0 - progress,
                            "mask/ratio": 0.5 + 0.4 * progress})
        pred_lin = _biased_predictions(rng, y_ulb, recall - 0.05, prior)
        logs = {"pseudo/linear": torch.from_numpy(pred_lin),
                "pseudo/mask": torch.from_numpy((rng.random(len(y_ulb)) < 0.6).astype("f4"))}
        if pseudo == "daso":
            logs["pseudo/semantic"] = torch.from_numpy(
                _biased_predictions(rng, y_ulb, recall[::-1].copy(), prior[::-1].copy()))
            logs["pseudo/final"] = torch.from_numpy(
                _biased_predictions(rng, y_ulb, recall, prior))
        tracker.update(logs, torch.from_numpy(y_ulb))
        log.append_per_class(tracker.flush(step, names))
        if daso is not None:  # m_hat drifts from the labeled prior towards uniform
            daso.m_hat.copy_(torch.from_numpy((1 - progress) * prior + progress / num_classes))
            log.append_per_class(refiner_rows(step, daso, names))
        log.append_metrics({"step": step, "split": "train", **tracker.last_summary})
        m = classification_metrics(y_test, _biased_predictions(rng, y_test, recall, prior),
                                   num_classes)
        log.append_per_class(per_class_rows(step, "test", "prediction", "all", m, names))
        log.append_metrics({"step": step, "split": "test", "top1": m["top1"],
                            "balanced_acc": m["balanced_acc"]})
        log.write_confusion(m["confusion"])
        top1s.append(m["top1"])
    if stop_at is None:
        log.write_summary({"status": "finished", "step": last,
                           "final": {"test/top1": m["top1"],
                                     "test/balanced_acc": m["balanced_acc"]},
                           "median_last20": {"test/top1": median_of_last(top1s)}})
    return run_dir


@pytest.fixture
def make_run(tmp_path):
    """Factory: make_run(name, **kwargs) -> a synthetic run folder under tmp_path."""
    def _make(name: str = "run", **kwargs) -> Path:
        return write_synthetic_run(tmp_path / name, **kwargs)
    return _make


def write_minimal_run(run_dir: Path, *, algorithm: str = "fixmatch", pseudo: str = "none",
                      gamma_l: float = 100, n1: int = 1500, seed: int = 0,
                      test_top1: list[float] = (), median_top1: float | None = None) -> Path:
    """A run folder with only config.yaml, test rows in metrics.jsonl and maybe a summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"seed": seed, "algorithm": {"name": algorithm}, "pseudo": {"name": pseudo},
              "dataset": {"name": "cifar10_lt", "n1": n1, "m1": 3000, "gamma_l": gamma_l,
                          "gamma_u": gamma_l, "reverse_unlabeled": False},
              "trainer": {"iterations": 100 * max(1, len(test_top1))}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    log = RunLog(run_dir)
    for i, top1 in enumerate(test_top1):
        log.append_metrics({"step": 100 * (i + 1), "split": "test", "top1": top1,
                            "balanced_acc": top1})
    if median_top1 is not None:
        log.write_summary({"status": "finished", "step": 100 * len(test_top1),
                           "final": {"test/top1": test_top1[-1] if test_top1 else None},
                           "median_last20": {"test/top1": median_top1}})
    return run_dir


@pytest.fixture
def minimal_run():
    """Factory: minimal_run(path, **kwargs) -> a config + test-rows run folder."""
    return write_minimal_run
