"""One statistic, one number: summary.json, the console, the report and compare agree, and
never present (or rank by) a median of the last k evaluations that a run does not have."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from imbssl.diagnostics.aggregate import collect_main, collect_runs
from imbssl.diagnostics.logfile import RunLog, read_run
from imbssl.diagnostics.report import build_report
from imbssl.diagnostics.summary_stats import (
    choose_stat,
    console_lines,
    median_last,
    parse_stat,
    stat_text,
    statistic,
    summarize,
)

# Two quickstart-sized runs of 12 evaluations (issue 28): the whole-curve median ranks
# "plain" first (it plateaus early), the final evaluation ranks "daso" first.
PLAIN = [0.10, *[0.789] * 10, 0.854]
DASO = [0.10, 0.30, 0.45, 0.55, 0.62, 0.70, 0.75, 0.80, 0.83, 0.85, 0.87, 0.88]


def write_run(run_dir, curve, pseudo, k=20, every=50, reduce="median"):
    """A run folder as the trainer writes it: config, test rows, summary.json."""
    run_dir.mkdir(parents=True)
    config = {"seed": 0, "algorithm": {"name": "fixmatch"}, "pseudo": {"name": pseudo},
              "dataset": {"name": "digits_lt", "n1": 30, "m1": 90, "gamma_l": 10,
                          "gamma_u": 10, "reverse_unlabeled": False},
              "trainer": {"iterations": every * len(curve), "eval_interval": every,
                          "summary_last": k, "summary_reduce": reduce}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    log = RunLog(run_dir)
    history = {"test/top1": [], "test/balanced_acc": []}
    for i, value in enumerate(curve):
        log.append_metrics({"step": every * (i + 1), "split": "test", "top1": value,
                            "balanced_acc": value})
        history["test/top1"].append(value)
        history["test/balanced_acc"].append(value)
    log.write_summary({"status": "finished", "step": every * len(curve),
                       **summarize(history, k, reduce)})
    return run_dir


@pytest.fixture
def twelve(tmp_path):
    return [write_run(tmp_path / "runs" / "plain", PLAIN, "none"),
            write_run(tmp_path / "runs" / "daso", DASO, "daso")]


def test_the_curves_disagree_in_order():
    whole = [sorted(c)[len(c) // 2 - 1: len(c) // 2 + 1] for c in (PLAIN, DASO)]
    assert sum(whole[0]) > sum(whole[1])  # whole-curve median: plain first
    assert PLAIN[-1] < DASO[-1]  # final: daso first


def test_summary_json_has_no_median_of_twenty_with_twelve_evaluations(twelve):
    for run in twelve:
        summary = json.loads((run / "summary.json").read_text())
        assert "median_last20" not in summary
        assert summary["evaluations"] == 12 and summary["summary_last"] == 20
        assert math.isnan(read_run(run).median_last("test/top1", 20))
    text = console_lines({"test/balanced_acc": PLAIN, "test/top1": PLAIN}, 20)
    assert "no median_last20" in text and "this run had 12" in text and "85.40%" in text


def test_compare_falls_back_to_final_says_so_and_ranks_daso_first(twelve, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert collect_main([str(p) for p in twelve] + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "final" in captured.err
    table = (out / "table.md").read_text()
    assert "(final evaluation)" in table and "needs 20 test evaluations" in table
    assert "**88.00" in table and "85.40" in table  # ranked (bold) by the final value
    assert "78.90" not in table  # the whole-curve median of "plain" is nowhere
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["stat"]) == {"final"}
    # asking for the protocol median explicitly falls back too, with the warning
    assert collect_main([str(p) for p in twelve] + ["--out", str(out), "--stat",
                                                     "median_last20"]) == 0
    assert "needs 20" in capsys.readouterr().err


def test_report_ranks_by_the_same_statistic_and_shows_no_median(twelve, tmp_path):
    html_path, md_path = build_report(twelve, tmp_path / "report")
    for text in (html_path.read_text(), md_path.read_text()):
        assert "78.90" not in text and "77.50" not in text  # no whole-curve median anywhere
        assert "Ranked by test balanced accuracy, final evaluation (final): fixmatch+DASO " \
               "88.00, fixmatch 85.40." in text
        assert "(12 &lt; 20)" in text or "(12 < 20)" in text
    records = collect_runs(twelve)
    best = records.loc[records["value"].idxmax(), "method"]
    assert best == "fixmatch+DASO"  # compare's best = the report's first


def test_median_needs_k_values():
    assert math.isnan(median_last([0.1, 0.2, 0.3], 5))
    assert median_last([0.9, 0.1, 0.2, 0.3], 3) == pytest.approx(0.2)
    assert median_last([float("nan"), 0.4, 0.6], 2) == pytest.approx(0.5)
    assert parse_stat("final") is None and parse_stat("median_last7") == 7
    for bad in ("median", "median_last0", "mean"):
        with pytest.raises(ValueError):
            parse_stat(bad)


def test_summarize_names_its_k_and_keeps_only_complete_medians():
    history = {"test/top1": [0.1, 0.2, 0.3], "test/top1_posthoc_la": [0.3]}
    out = summarize(history, 2)
    assert out["median_last2"] == {"test/top1": pytest.approx(0.25)}
    assert out["final"] == {"test/top1": 0.3, "test/top1_posthoc_la": 0.3}
    assert out["summary_last"] == 2 and out["evaluations"] == 3
    assert "median_last5" not in summarize(history, 5)


def test_runs_evaluated_differently_are_warned_about(tmp_path):
    long = write_run(tmp_path / "a", [0.5] * 25, "none", k=20)
    short = write_run(tmp_path / "b", [0.5] * 25, "daso", k=20, every=100)
    choice = choose_stat([read_run(long), read_run(short)], labels=["a", "b"])
    assert choice.stat == "median_last20"
    assert any("evaluated differently" in w and "a: 50, b: 100" in w for w in choice.warnings)
    mixed = choose_stat([read_run(long), read_run(tmp_path / "b")], "final", ["a", "b"])
    assert mixed.stat == "final"


# ------------------------------------------------ mean of the last k (recipe: summary_reduce)
def test_mean_window_is_its_own_statistic():
    assert parse_stat("mean_last20") == 20
    assert stat_text("mean_last3") == "mean of the last 3 evaluations"
    assert statistic([0.1, 0.5, 0.6, 0.9], "mean_last3") == pytest.approx(2.0 / 3)
    assert statistic([0.1, 0.5, 0.6, 0.9], "median_last3") == pytest.approx(0.6)
    assert math.isnan(statistic([0.5, 0.6], "mean_last3"))
    out = summarize({"test/top1": [0.1, 0.5, 0.6, 0.9]}, 3, "mean")
    assert out["mean_last3"]["test/top1"] == pytest.approx(2.0 / 3)
    assert "median_last3" not in out and out["summary_reduce"] == "mean"
    assert "summary_reduce" not in summarize({"test/top1": [0.1]}, 3)  # median: as before
    with pytest.raises(ValueError, match="mean_last<k>"):
        parse_stat("average_last20")


def test_runs_with_a_mean_recipe_rank_by_their_mean(tmp_path):
    curve_a = [0.1, 0.2, 0.9, 0.3, 0.3]  # mean of last 3: 0.5, median 0.3
    curve_b = [0.1, 0.2, 0.4, 0.4, 0.4]  # mean 0.4, median 0.4
    runs = [read_run(write_run(tmp_path / name, c, "none", k=3, reduce="mean"))
            for name, c in (("a", curve_a), ("b", curve_b))]
    choice = choose_stat(runs, labels=["a", "b"])
    assert choice.stat == "mean_last3" and not choice.warnings
    records = collect_runs([tmp_path], metric="test/balanced_acc")
    assert records.attrs["choice"].stat == "mean_last3"
    report = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")[1].read_text()
    assert "mean of the last 3 evaluations" in report and "median_last3" not in report
    line = console_lines({"test/balanced_acc": curve_a}, 3, reduce="mean")
    assert "mean_last3" in line and "50.00%" in line


def test_runs_with_different_reductions_are_warned_and_share_the_median(tmp_path):
    a = read_run(write_run(tmp_path / "a", [0.1, 0.2, 0.3], "none", k=3, reduce="mean"))
    b = read_run(write_run(tmp_path / "b", [0.1, 0.2, 0.3], "none", k=3))
    choice = choose_stat([a, b], labels=["a", "b"])
    assert choice.stat == "median_last3"
    assert any("trainer.summary_reduce (a: mean, b: median)" in w for w in choice.warnings)
