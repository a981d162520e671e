"""analysis/comparators_digits.py: rows, job waves, resumability and the table's cells."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(ROOT / "analysis"))
    spec = importlib.util.spec_from_file_location("comparators_digits",
                                                  ROOT / "analysis" / "comparators_digits.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comparators_digits"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


cmp = _script()


def _args(tmp_path, seeds=(0, 1)):
    return SimpleNamespace(seeds=list(seeds), threads=1, out_runs=tmp_path, iterations=10,
                           batch_size=8, eval_interval=5, summary_last=2, override=[])


def test_rows_have_unique_labels_and_known_bases():
    labels = [r.label for r in cmp.ROWS]
    assert len(labels) == len(set(labels))
    for row in cmp.ROWS:
        assert any(o.startswith("algorithm=") for o in row.overrides), row.label
        assert row.after is None or row.after in labels
        if row.label.endswith("+daso"):  # DASO in the run itself or in the run it starts from
            assert any(o.startswith("pseudo=daso") for o in row.overrides) or \
                (row.after or "").endswith("+daso"), row.label


def test_a_row_after_another_waits_for_it_and_reads_its_run(tmp_path):
    rows = {"fixmatch": cmp.Row("fixmatch", ("algorithm=fixmatch",)),
            "crt": cmp.Row("crt", ("algorithm=crt", "algorithm.init_from={after}"),
                           after="fixmatch")}
    waves = cmp.pending_jobs(_args(tmp_path), rows, done={("fixmatch", 1)})
    assert [[(label, seed) for label, seed, *_ in w] for w in waves] == [
        [("fixmatch", 0)], [("crt", 0), ("crt", 1)]]
    crt0 = waves[1][0][2]
    assert f"algorithm.init_from={tmp_path / 'fixmatch-seed0'}" in crt0
    assert f"run_dir={tmp_path / 'crt-seed0'}" in crt0 and "seed=0" in crt0


def test_cells_and_delta_against_the_same_method_without_daso():
    rows = {"fixmatch": cmp.Row("fixmatch", ("algorithm=fixmatch",)),
            "fixmatch+daso": cmp.Row("fixmatch+daso", ("algorithm=fixmatch", "pseudo=daso"),
                                     paper=("Table 1", 70.1))}
    def rec(m, s, v):
        return {"method": m, "seed": s, "bal_acc_median": v, "bal_acc_final": v,
                "tail_recall_median": v / 2}

    records = [rec("fixmatch", 0, 0.5), rec("fixmatch", 1, 0.7), rec("fixmatch+daso", 0, 0.8)]
    lines = cmp.table(records, rows).splitlines()
    assert lines[2] == "| `fixmatch` | 0,1 | 60.00 ± 14.14 | 60.00 ± 14.14 | 30.00 ± 7.07 | – | – |"
    assert lines[3] == ("| `fixmatch+daso` | 0 | 80.00 ± – | 80.00 ± – | 40.00 ± – | +20.00 "
                        "| 70.1 (Table 1) |")


def test_unknown_row_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="unknown rows"):
        cmp.main(["--rows", "no-such-method", "--list"])
