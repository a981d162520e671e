"""analysis/benchmark_digits.py: tail classes, per-class recall read-back and a tiny run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "analysis" / "benchmark_digits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tail_classes_are_the_three_smallest_labeled(bench):
    assert bench.tail_classes([30, 23, 17, 13, 10, 8, 6, 5, 3, 3]) == [7, 8, 9]
    assert bench.tail_classes([3, 5, 30, 3]) == [0, 1, 3]


def test_method_overrides(bench):
    args = bench.parse_args(["--out-runs", "/tmp/x"])
    ov = bench.job_overrides(args, "remixmatch+daso", 1)
    assert "algorithm=remixmatch" in ov and "pseudo=daso_quick" in ov and "seed=1" in ov
    assert "algorithm.dist_align=none" in ov  # official ReMixMatch+DASO setting
    assert "pseudo=none" in bench.job_overrides(args, "fixmatch", 0)


def test_tiny_benchmark_writes_tables(bench, tmp_path):
    out = tmp_path / "results"
    threads = torch.get_num_threads()  # the in-process run sets one thread
    rc = bench.main(["--iterations", "4", "--eval-interval", "2", "--summary-last", "2",
                     "--seeds", "0", "1", "--algorithms", "supervised", "fixmatch",
                     "--workers", "1", "--out", str(out), "--out-runs", str(tmp_path / "runs"),
                     "--override", "trainer.batch_size=8"])
    torch.set_num_threads(threads)
    assert rc == 0
    records = json.loads((out / "digits_benchmark_runs.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in records) == [
        (m, s) for m in ("fixmatch", "fixmatch+daso", "supervised") for s in (0, 1)]
    for r in records:
        assert r["evaluations"] == 2 and r["final_step"] == 4 and len(r["final_recall"]) == 10
        assert 0.0 <= r["tail_recall_median"] <= 1.0
    md = (out / "digits_benchmark.md").read_text()
    assert "| fixmatch | " in md and "Table 2a" in md and "Table 2b" in md
    assert (out / "digits_benchmark_runs.csv").read_text().count("\n") == 7
