"""Classification metrics from predictions or confusion matrices, in the tidy per-class format.

Conventions follow scikit-learn: ``precision_recall_fscore_support(labels=range(K),
zero_division=0)`` for the per-class arrays and ``balanced_accuracy_score`` (mean recall over
the classes present in ``y_true``) for balanced accuracy. ``confusion[i, j]`` counts samples of
true class ``i`` predicted as ``j``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PER_CLASS_METRICS = ("precision", "recall", "f1", "support", "predicted")
PER_CLASS_COLUMNS = ("step", "source", "kind", "subset", "class", "class_name", "metric", "value")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """K x K int64 confusion matrix (rows = true class, columns = predicted class)."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_to_metrics(confusion: np.ndarray) -> dict:
    """Top-1, balanced accuracy and per-class arrays from a K x K confusion matrix."""
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be square, got shape {cm.shape}")
    cm = np.rint(cm).astype(np.int64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    recall = _safe_div(tp, support)
    total = int(cm.sum())
    present = support > 0
    return {
        "top1": float(tp.sum() / total) if total else float("nan"),
        "balanced_acc": float(recall[present].mean()) if present.any() else float("nan"),
        "precision": _safe_div(tp, predicted),
        "recall": recall,
        "f1": _safe_div(2 * tp, support + predicted),
        "support": support,
        "predicted": predicted,
        "confusion": cm,
    }


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Top-1, balanced accuracy, per-class P/R/F1/support/predicted and the confusion matrix."""
    return confusion_to_metrics(confusion_matrix(y_true, y_pred, num_classes))


def class_names_or_default(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The given class names, or "0".."K-1" when there are none."""
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [str(c) for c in class_names]


def per_class_rows(step: int, source: str, kind: str, subset: str, metrics: dict,
                   class_names: Sequence[str] | None = None) -> list[dict]:
    """Rows of the tidy per-class format (one per class and metric) for ``per_class.csv``."""
    num_classes = len(metrics["support"])
    names = class_names_or_default(class_names, num_classes)
    rows = []
    for c in range(num_classes):
        for metric in PER_CLASS_METRICS:
            value = metrics[metric][c]
            rows.append({"step": int(step), "source": source, "kind": kind, "subset": subset,
                         "class": c, "class_name": names[c], "metric": metric,
                         "value": float(value)})
    return rows


def median_of_last(values: Sequence[float], n: int = 20) -> float:
    """Median of the last ``n`` values (DASO's reporting protocol); NaN when empty."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)][-n:]
    return float(np.median(arr)) if arr.size else float("nan")


def format_per_class_table(metrics: dict, class_names: Sequence[str] | None = None,
                           labeled_counts: Sequence[int] | None = None) -> str:
    """Fixed-width text table of per-class precision/recall/F1/support plus overall accuracy."""
    num_classes = len(metrics["support"])
    names = class_names_or_default(class_names, num_classes)
    width = max([5] + [len(n) for n in names])
    header = (f"{'class':<{width}}  {'labeled':>8}  {'precision':>9}  {'recall':>7}  "
              f"{'f1':>7}  {'support':>8}")
    lines = [header, "-" * len(header)]
    for c in range(num_classes):
        lab = "-" if labeled_counts is None else str(int(labeled_counts[c]))
        lines.append(f"{names[c]:<{width}}  {lab:>8}  {metrics['precision'][c]:>9.4f}  "
                     f"{metrics['recall'][c]:>7.4f}  {metrics['f1'][c]:>7.4f}  "
                     f"{int(metrics['support'][c]):>8d}")
    lines.append("-" * len(header))
    lines.append(f"top1 {100 * metrics['top1']:.2f}%  "
                 f"balanced_acc {100 * metrics['balanced_acc']:.2f}%")
    return "\n".join(lines)


def final_accuracy_lines(metrics: dict, history: Sequence[float], window: int = 20) -> str:
    """The last lines a run prints, from the balanced-accuracy ``history`` and the final
    ``metrics``: ``summary_stats.console_lines`` (the one definition)."""
    from imbssl.diagnostics.summary_stats import console_lines

    return console_lines({"test/balanced_acc": list(history)}, window, metrics)
