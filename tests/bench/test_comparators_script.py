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
        if row.reads is not None:  # LA (inf): a metric of the base row's runs, no run
            assert row.reads in labels and not row.overrides and row.after is None
            continue
        assert any(o.startswith("algorithm=") for o in row.overrides), row.label
        assert row.after is None or row.after in labels
        if row.label.endswith("+daso"):  # DASO in the run itself or in the run it starts from
            assert any(o.startswith("pseudo=daso") for o in row.overrides) or \
                (row.after or "").endswith("+daso"), row.label
    assert cmp.rows_by_label()["fixmatch+lainf"].reads == "fixmatch"
    assert cmp.rows_by_label()["fixmatch+lainf+daso"].reads == "fixmatch+daso"


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


def test_la_inf_rows_train_nothing_and_read_the_base_runs(tmp_path):
    import json

    rows = {"fixmatch": cmp.Row("fixmatch", ("algorithm=fixmatch",)),
            "fixmatch+lainf": cmp.Row("fixmatch+lainf", (), reads="fixmatch")}
    waves = cmp.pending_jobs(_args(tmp_path, seeds=(0,)), rows, done=set())
    assert [[label for label, *_ in w] for w in waves] == [["fixmatch"]]
    run = tmp_path / "fixmatch-seed0"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "summary_last": 2, "final": {"test/balanced_acc": 0.5, cmp.POSTHOC: 0.61},
        "median_last2": {"test/balanced_acc": 0.4, cmp.POSTHOC: 0.6}}))
    base = {"method": "fixmatch", "seed": 0, "bal_acc_median": 0.4, "bal_acc_final": 0.5,
            "tail_recall_median": 0.2, "tail_recall_final": 0.2, "summary_last": 2,
            "run_dir": str(run)}
    rec = cmp.posthoc_record(base, "fixmatch+lainf")
    assert (rec["method"], rec["bal_acc_median"], rec["bal_acc_final"]) == (
        "fixmatch+lainf", 0.6, 0.61)
    line = cmp.table([base, rec], rows).splitlines()[3]
    assert line.startswith("| `fixmatch+lainf` | 0 | 60.00 ± – | 61.00 ± – | – |")
    (run / "summary.json").write_text(json.dumps({"summary_last": 2, "final": {},
                                                  "median_last2": {}}))
    assert cmp.posthoc_record(base, "fixmatch+lainf") is None  # not logged: no row


def test_supervised_rows_take_the_official_solver_scaled(tmp_path):
    row = cmp.rows_by_label()["supervised"]
    args = _args(tmp_path)
    args.iterations = 1000
    over = cmp.job_overrides(args, row, 0)
    assert "optim=sgd_multistep" in over
    assert "optim.milestones=[799,900]" in over and "optim.warmup_iters=25" in over


def test_kept_records_fill_only_missing_pairs_of_trained_rows(tmp_path):
    import json

    rows = {"a": cmp.Row("a", ("algorithm=a",)), "b": cmp.Row("b", (), reads="a")}
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps([{"method": "a", "seed": 0, "v": "old"},
                                {"method": "a", "seed": 1, "v": "old"},
                                {"method": "b", "seed": 0, "v": "old"},
                                {"method": "gone", "seed": 0, "v": "old"}]))
    merged = cmp.merge_kept([{"method": "a", "seed": 0, "v": "new"}], kept, rows)
    assert sorted((r["method"], r["seed"], r["v"]) for r in merged) == [
        ("a", 0, "new"), ("a", 1, "old")]
    merged = cmp.merge_kept([{"method": "a", "seed": 0, "v": "new"}], kept, rows, drop=("a",))
    assert [(r["method"], r["seed"]) for r in merged] == [("a", 0)]
