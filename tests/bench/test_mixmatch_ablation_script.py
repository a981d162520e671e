"""analysis/mixmatch_ablation_digits.py: the table's cells and the resumable job list."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(ROOT / "analysis"))
    spec = importlib.util.spec_from_file_location("mixmatch_ablation_digits",
                                                  ROOT / "analysis" / "mixmatch_ablation_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ablation = _script()


def test_error_cell_mean_and_spread():
    assert ablation.error_cell([0.8, 0.9]) == "15.00 ± 7.07"
    assert ablation.error_cell([0.8]) == "20.00 ± –"  # one seed has no spread


def test_finished_runs_are_not_trained_again(monkeypatch, tmp_path):
    rows = ablation.ablation_rows()
    finished = [{"method": r, "seed": s, "bal_acc_median": 0.5} for r in rows for s in (0, 1)]
    monkeypatch.setattr(ablation, "records_from_runs", lambda dirs, rows: finished)
    trained = []

    class Pool:  # records what would be trained
        def __init__(self, *a, **k): pass
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def imap_unordered(self, fn, jobs):
            trained.extend(jobs)
            return iter(())

    monkeypatch.setattr(ablation.mp, "get_context", lambda kind: type("C", (), {"Pool": Pool}))
    monkeypatch.setattr(ablation, "write", lambda *a: tmp_path / "t.md")
    assert ablation.main(["--seeds", "0", "1", "2", "--out-runs", str(tmp_path)]) == 0
    assert sorted({(row, seed) for row, seed, *_ in trained}) == [(r, 2) for r in sorted(rows)]
