"""The summary statistics of a run's evaluations, defined once.

Every place that reports or ranks runs (the console's last lines, ``summary.json``, the
HTML/Markdown report, ``imbssl compare`` and ``analysis/collect_results.py``) takes its
numbers from here, so one name means one number everywhere:

* ``final``: the value at the last evaluation.
* ``median_last<k>``: the median of the last ``k`` evaluations (DASO's reporting protocol,
  k = ``trainer.summary_last``, 20 in the paper). It exists only when the run has at least
  ``k`` evaluations of that metric: with fewer it would be the median of the whole learning
  curve, early low accuracies included, and could rank runs backwards. It is then neither
  stored, printed, shown nor used to rank; comparisons fall back to ``final``.
* ``mean_last<k>``: the mean of the last ``k`` evaluations, the protocol of papers that
  report it (e.g. ACR's and several 2024 methods' "average of the last 20 evaluations"),
  chosen per run with ``trainer.summary_reduce=mean`` (a recipe sets it); the same rule for
  fewer than ``k`` evaluations. A run stores one of the two, the one its config names; the
  window statistic of a run is ``<trainer.summary_reduce>_last<trainer.summary_last>``.

Evaluated metrics per split (``test/...``, ``valid/...``): ``top1`` and ``balanced_acc`` of
the evaluated prediction, and ``top1_posthoc_la`` / ``balanced_acc_posthoc_la`` of the
post-hoc logit-adjusted one (Menon et al., ICLR 2021, Eq. 9 with tau = 1:
``argmax_y f_y(x) - log pi_y``, pi = class frequencies of the labeled set; as the official
DASO code's ``top1_la`` in lib/algorithm/base_algorithm.py, ``eval_loop``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

PROTOCOL_LAST = 20  # DASO: the median of the last 20 evaluations
PROTOCOL_REDUCE = "median"  # DASO's; "mean" for the papers that average the last k
REDUCES = ("median", "mean")
FINAL = "final"
EVAL_METRICS = ("top1", "balanced_acc", "top1_posthoc_la", "balanced_acc_posthoc_la")
POSTHOC_TAU = 1.0  # official DASO eval_loop: outputs - p_data.log()
_WINDOW = re.compile(r"(median|mean)_last(\d+)$")


def evaluation_scores(confusions) -> dict[str, float]:
    """The evaluated metrics of one split from ``measured_confusions``' matrices: top1 and
    balanced_acc of the evaluated prediction (matrix 0) and ``*_posthoc_la`` of the
    post-hoc logit-adjusted one (matrix 1, when there is one)."""
    from imbssl.diagnostics.metrics import confusion_to_metrics

    out = {}
    for confusion, suffix in zip(confusions, ("", "_posthoc_la")):
        metrics = confusion_to_metrics(confusion)
        out[f"top1{suffix}"] = float(metrics["top1"])
        out[f"balanced_acc{suffix}"] = float(metrics["balanced_acc"])
    return out


def window_key(k: int, reduce: str = PROTOCOL_REDUCE) -> str:
    """The name of a window statistic over ``k`` evaluations, e.g. ``median_last20``."""
    if reduce not in REDUCES:
        raise ValueError(f"unknown reduction {reduce!r}: use median or mean")
    return f"{reduce}_last{int(k)}"


def median_key(k: int) -> str:
    """The name of the protocol median over ``k`` evaluations, e.g. ``median_last20``."""
    return window_key(k, "median")


def _parse(name: str) -> tuple[str | None, int | None]:
    if name == FINAL:
        return None, None
    match = _WINDOW.match(str(name))
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"unknown statistic {name!r}: use 'final', 'median_last<k>' or "
                         "'mean_last<k>' (e.g. median_last20)")
    return match.group(1), int(match.group(2))


def parse_stat(name: str) -> int | None:
    """``"final"`` -> None, ``"median_last<k>"`` / ``"mean_last<k>"`` -> k; ValueError for
    anything else."""
    return _parse(name)[1]


def stat_reduce(name: str) -> str | None:
    """``"median"`` or ``"mean"`` of a window statistic; None for ``final``."""
    return _parse(name)[0]


def stat_text(name: str) -> str:
    """Human wording: "median of the last 20 evaluations" or "final evaluation"."""
    reduce, k = _parse(name)
    return "final evaluation" if k is None else f"{reduce} of the last {k} evaluations"


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def median_last(values: Sequence[float], k: int) -> float:
    """Median of the last ``k`` values; NaN when there are fewer than ``k`` (never the
    median of a shorter curve)."""
    arr = _finite(values)
    return float(np.median(arr[-k:])) if k >= 1 and arr.size >= k else float("nan")


def mean_last(values: Sequence[float], k: int) -> float:
    """Mean of the last ``k`` values; NaN when there are fewer than ``k``."""
    arr = _finite(values)
    return float(np.mean(arr[-k:])) if k >= 1 and arr.size >= k else float("nan")


def window_value(values: Sequence[float], k: int, reduce: str = PROTOCOL_REDUCE) -> float:
    """The ``reduce`` ("median" | "mean") of the last ``k`` values (NaN with fewer)."""
    return (median_last if reduce == "median" else mean_last)(values, k)


def final_value(values: Sequence[float]) -> float:
    """The last finite value; NaN when there is none."""
    arr = _finite(values)
    return float(arr[-1]) if arr.size else float("nan")


def statistic(values: Sequence[float], stat: str) -> float:
    """``values`` (one per evaluation, in order) summarised by ``stat``."""
    reduce, k = _parse(stat)
    return final_value(values) if k is None else window_value(values, k, reduce)


def summarize(history: Mapping[str, Sequence[float]], k: int,
              reduce: str = PROTOCOL_REDUCE) -> dict:
    """summary.json's statistics: ``final`` (every metric), ``<reduce>_last<k>`` (only the
    metrics with at least ``k`` evaluations; absent when none has), ``summary_last`` = k,
    ``summary_reduce`` (only when it is not the protocol median) and ``evaluations`` = the
    number of test evaluations."""
    final = {name: float(v[-1]) for name, v in history.items() if len(v)}
    windows = {name: window_value(v, k, reduce) for name, v in history.items() if len(v) >= k}
    out = {"final": final}
    if windows:
        out[window_key(k, reduce)] = windows
    out["summary_last"] = int(k)
    if reduce != PROTOCOL_REDUCE:
        out["summary_reduce"] = reduce
    out["evaluations"] = len(history.get("test/top1", ()))
    return out


def console_lines(history: Mapping[str, Sequence[float]], k: int,
                  last: Mapping[str, float] | None = None,
                  reduce: str = PROTOCOL_REDUCE) -> str:
    """The last lines a run prints: final test accuracies (plain and post-hoc LA), and the
    window statistic (``reduce`` of the last ``k``) only when the run had ``k`` evaluations.
    ``last`` (keys ``top1``, ``balanced_acc``) stands in when the history is empty."""
    last = last or {}
    bal = final_value(history.get("test/balanced_acc") or [last.get("balanced_acc")])
    top1 = final_value(history.get("test/top1") or [last.get("top1")])
    lines = [f"final test balanced accuracy: {_pct(bal)}  "
             f"(top-1 {_pct(top1)}; EMA model, last evaluation)"]
    la_bal = final_value(history.get("test/balanced_acc_posthoc_la") or [])
    if math.isfinite(la_bal):
        la_top1 = final_value(history.get("test/top1_posthoc_la") or [])
        lines.append(f"post-hoc logit-adjusted (tau {POSTHOC_TAU:g}): balanced accuracy "
                     f"{_pct(la_bal)}  (top-1 {_pct(la_top1)})")
    n = len(history.get("test/balanced_acc") or [])
    key = window_key(k, reduce)
    who = "DASO-protocol" if reduce == PROTOCOL_REDUCE else "protocol"
    if n >= k:
        lines.append(f"{who} summary ({key}): {reduce} of the last {k} "
                     "evaluations, balanced accuracy "
                     f"{_pct(window_value(history['test/balanced_acc'], k, reduce))}")
    else:
        lines.append(f"(no {key}: the {reduce} of the last {k} evaluations needs "
                     f"{k} evaluations, this run had {n})")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%" if math.isfinite(value) else "n/a"


# ----------------------------------------------------------------- run folders
def run_window(run) -> int:
    """The run's k: summary.json's ``summary_last``, else ``trainer.summary_last``, else 20."""
    for value in ((run.summary or {}).get("summary_last"), run.cfg("trainer.summary_last")):
        try:
            if value is not None and int(value) >= 1:
                return int(value)
        except (TypeError, ValueError):
            continue
    return PROTOCOL_LAST


def run_reduce(run) -> str:
    """The run's window reduction: summary.json's ``summary_reduce``, else
    ``trainer.summary_reduce``, else the protocol median."""
    for value in ((run.summary or {}).get("summary_reduce"), run.cfg("trainer.summary_reduce")):
        if value in REDUCES:
            return value
    return PROTOCOL_REDUCE


def run_window_key(run) -> str:
    """The run's own window statistic, e.g. ``median_last20`` or ``mean_last20``."""
    return window_key(run_window(run), run_reduce(run))


def run_history(run, metric: str) -> list[float]:
    """Values of ``metric`` ("split/name") at each evaluation, from metrics.jsonl."""
    split, _, name = metric.partition("/")
    return run.split_series(split, name).tolist()


def num_evaluations(run, split: str = "test") -> int:
    """How many evaluations of ``split`` the run logged."""
    return len(run_history(run, f"{split}/top1"))


def run_statistic(run, metric: str, stat: str) -> float:
    """``metric`` of a run folder summarised by ``stat`` (a fraction; NaN when the run does
    not have it). Computed from metrics.jsonl; summary.json's ``final`` stands in for a
    metric metrics.jsonl does not hold."""
    values = run_history(run, metric)
    if not values and parse_stat(stat) is None:
        stored = ((run.summary or {}).get(FINAL) or {}).get(metric)
        return float(stored) if stored is not None else float("nan")
    return statistic(values, stat)


@dataclass
class Choice:
    """The statistic runs are compared by, and why (sentences to show and warn with)."""

    stat: str
    notes: list[str]
    warnings: list[str]

    @property
    def text(self) -> str:
        return stat_text(self.stat)


def _evaluation_setup(run) -> dict[str, str]:
    """What decides how a run was evaluated, for the 'evaluated differently' warning."""
    return {"evaluations": str(num_evaluations(run)),
            "every": str(run.cfg("trainer.eval_interval", "?")),
            "k": str(run_window(run)), "reduce": run_reduce(run)}


def choose_stat(runs: Sequence, requested: str | None = None,
                labels: Sequence[str] | None = None) -> Choice:
    """The one statistic every run has: ``requested`` (or the runs' own window statistic,
    ``<trainer.summary_reduce>_last<k>``; the median when their reductions differ) when each run has that many test evaluations, else ``final``; with a note
    saying which and why, and warnings when the runs were evaluated differently."""
    labels = list(labels) if labels is not None else [str(r.path) for r in runs]
    setups = [_evaluation_setup(r) for r in runs]
    warnings = []
    differ = [key for key in ("evaluations", "every", "k", "reduce")
              if len({s[key] for s in setups}) > 1]
    if differ:
        words = {"evaluations": "test evaluations", "every": "iterations between evaluations",
                 "k": "trainer.summary_last", "reduce": "trainer.summary_reduce"}
        parts = [f"{words[key]} ({', '.join(f'{lab}: {s[key]}' for lab, s in zip(labels, setups))})"
                 for key in differ]
        warnings.append("the runs were evaluated differently: " + "; ".join(parts))
    if requested is None:
        windows = {run_window(r) for r in runs}
        reduces = {run_reduce(r) for r in runs}
        requested = window_key(windows.pop() if len(windows) == 1 else max(windows),
                               reduces.pop() if len(reduces) == 1 else PROTOCOL_REDUCE)
    k = parse_stat(requested)
    counts = [int(s["evaluations"]) for s in setups]
    if k is None:
        return Choice(FINAL, [f"Runs compared by the {stat_text(FINAL)}."], warnings)
    short = [(lab, n) for lab, n in zip(labels, counts) if n < k]
    if not short:
        return Choice(requested, [f"Runs compared by the {stat_text(requested)} "
                                  f"({requested})."], warnings)
    who = ", ".join(f"{lab}: {n}" for lab, n in short)
    note = (f"Runs compared by the {stat_text(FINAL)}: {requested} needs {k} test "
            f"evaluations, and fewer were logged ({who}).")
    return Choice(FINAL, [note], [*warnings, note[0].lower() + note[1:]])
