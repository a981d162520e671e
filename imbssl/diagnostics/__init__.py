"""Diagnostics of head-class bias: per-class metrics, pseudo-label tracking, run-folder files,
plots, reports and paper-style tables.

The light modules (metrics, tracker, logfile, summary_stats) are imported here; plots, report and aggregate
(which pull in matplotlib/seaborn) load on first use of one of their names.
"""
from __future__ import annotations

import importlib

from imbssl.diagnostics.logfile import (
    Run,
    RunLog,
    is_run_dir,
    read_metrics,
    read_per_class,
    read_run,
)
from imbssl.diagnostics.metrics import (
    PER_CLASS_COLUMNS,
    PER_CLASS_METRICS,
    classification_metrics,
    confusion_to_metrics,
    format_per_class_table,
    median_of_last,
    per_class_rows,
)
from imbssl.diagnostics.summary_stats import choose_stat, median_last, summarize
from imbssl.diagnostics.tracker import PseudoLabelTracker

_LAZY = {"make_plots": "plots", "make_figures": "plots", "build_report": "report",
         "report_main": "report", "collect_runs": "aggregate",
         "write_results": "aggregate", "collect_main": "aggregate"}

__all__ = ["PER_CLASS_COLUMNS", "PER_CLASS_METRICS", "PseudoLabelTracker", "Run", "RunLog",
           "choose_stat", "classification_metrics", "confusion_to_metrics",
           "format_per_class_table", "is_run_dir", "median_last", "median_of_last",
           "per_class_rows", "read_metrics", "read_per_class", "read_run", "summarize", *_LAZY]


def __getattr__(name: str):
    """Load plots/report/aggregate names on first access."""
    if name in _LAZY:
        module = importlib.import_module(f"imbssl.diagnostics.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'imbssl.diagnostics' has no attribute {name!r}")
