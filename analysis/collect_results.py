"""Collect a Hydra multirun folder into paper-style tables of accuracy and tail recall (CSV,
Markdown, LaTeX) and both against gamma with mean ± std bands over seeds (also: imbssl compare).

Usage: python analysis/collect_results.py MULTIRUN_DIR [RUN_DIR ...] [--metric test/top1]
       [--stat final|median_last<k>|mean_last<k>] [--out DIR]

By default cells are the runs' window statistic: the DASO-protocol median (or, where the
runs' recipe sets trainer.summary_reduce=mean, the mean) of the last k evaluations (k = the
runs' trainer.summary_last) when every run has k evaluations, else the final evaluation; the
caption says which (imbssl.diagnostics.summary_stats defines both).
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the aggregation CLI (works from a checkout without installing imbssl)."""
    try:
        from imbssl.diagnostics.aggregate import collect_main
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from imbssl.diagnostics.aggregate import collect_main
    return collect_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
