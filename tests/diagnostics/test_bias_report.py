"""Pseudo-label bias figures, the two-run comparison, tail recall vs gamma and final lines."""
import numpy as np
import pandas as pd
import pytest
import torch

from imbssl.diagnostics.aggregate import (
    aggregate,
    collect_runs,
    tail_classes,
    tail_recall,
    write_results,
)
from imbssl.diagnostics.logfile import read_run
from imbssl.diagnostics.metrics import final_accuracy_lines
from imbssl.diagnostics.plots import (
    _kinds_frame,
    _mask_frame,
    _refiner_frame,
    class_order,
    make_figures,
    per_class_at,
    plot_refiner_state,
    pseudo_kinds,
    shown_kinds,
)
from imbssl.diagnostics.report import (
    build_report,
    delta_table,
    differing_settings,
    report_main,
    settings_sentence,
)
from imbssl.diagnostics.tracker import refiner_rows
from imbssl.pseudo.base import IdentityRefiner
from imbssl.pseudo.daso import DASO


@pytest.fixture
def pair(make_run):
    """FixMatch and FixMatch+DASO that differ only in the refiner."""
    return [read_run(make_run("fm")), read_run(make_run("daso", pseudo="daso"))]


def test_new_figures_build_from_run_folders(pair, tmp_path):
    figs = make_figures(pair, tmp_path / "figs", ["FM", "FM+DASO"])
    stems = {f.png.stem: f for f in figs}
    for stem in ("pseudo_kinds", "mask_rate", "run0_pseudo_recall_heatmap",
                 "run1_pseudo_recall_heatmap", "run1_daso_state"):
        assert stems[stem].png.read_bytes()[:4] == b"\x89PNG" and stems[stem].svg.is_file()
    assert "run0_daso_state" not in stems  # no refiner state without DASO
    assert stems["run1_daso_state"].run == 1 and stems["pseudo_kinds"].run is None


def test_kinds_figure_data_all_runs_head_to_tail(pair):
    assert pseudo_kinds(pair[1]) == ["linear", "semantic", "final"]
    assert shown_kinds(pair[0]) == [("linear", "linear")]
    data = _kinds_frame(pair, ["FM", "FM+DASO"])
    assert list(dict.fromkeys(data["series"])) == [
        "FM: linear", "FM+DASO: linear", "FM+DASO: semantic", "FM+DASO: final"]
    assert len(data) == 4 * 2 * 10  # series x (recall, precision) x classes
    wide = per_class_at(pair[1], "pseudo", "semantic")
    order = class_order(pair[1])
    got = data[(data["series"] == "FM+DASO: semantic") & (data["metric"] == "recall")]
    np.testing.assert_allclose(got["value"], wide.loc[order, "recall"])


def test_linear_folded_into_final_when_identical(make_run):
    run = read_run(make_run("fm"))
    df = run.per_class
    final = df[df["kind"] == "linear"].assign(kind="final")
    run.per_class = pd.concat([df, final], ignore_index=True)
    assert shown_kinds(run) == [("final", "final (= linear)")]


def test_refiner_state_rows_and_figure(pair, tmp_path):
    data = _refiner_frame(pair[1])
    last = data[data["step"] == data["step"].max()].pivot(index="class", columns="metric",
                                                          values="value")
    assert np.isclose(last["m_hat"].sum(), 1.0)
    v = last["m_hat"] ** (1 / 1.5)
    np.testing.assert_allclose(last["blend_weight"], v / v.max(), rtol=1e-5)
    assert _refiner_frame(pair[0]).empty
    assert plot_refiner_state(pair[0], "FM", tmp_path, "x") is None


def test_refiner_rows_read_daso_buffers():
    daso = DASO(3, 4, dist_temperature=0.5)
    daso.m_hat.copy_(torch.tensor([0.6, 0.3, 0.1]))
    rows = refiner_rows(7, daso, ["a", "b", "c"])
    got = {(r["class_name"], r["metric"]): r["value"] for r in rows}
    assert len(rows) == 6 and {r["source"] for r in rows} == {"refiner"}
    assert got[("a", "blend_weight")] == pytest.approx(1.0)
    assert got[("c", "blend_weight")] == pytest.approx((0.1 / 0.6) ** 2, rel=1e-5)
    assert got[("b", "m_hat")] == pytest.approx(0.3)
    assert refiner_rows(7, IdentityRefiner()) == []


def test_mask_rate_per_class(pair):
    data = _mask_frame(pair, ["FM", "FM+DASO"])
    run = pair[1]
    every, conf = (per_class_at(run, "pseudo", "final", s) for s in ("all", "confident"))
    head = class_order(run)[0]
    got = data[(data["run"] == "FM+DASO") & (data["by"] == "pseudo-label class")
               & (data["position"] == 0)]["value"].item()
    assert got == pytest.approx(conf.loc[head, "predicted"] / every.loc[head, "predicted"])
    assert ((data["value"].dropna() >= 0) & (data["value"].dropna() <= 1)).all()
    assert set(data["by"]) == {"pseudo-label class", "true class"}


def test_two_run_report_names_the_differing_setting(pair, tmp_path, capsys):
    diff = differing_settings(pair)
    assert diff == {"pseudo.name": ["none", "daso"]}
    assert settings_sentence(diff) == "The runs differ in 1 setting: pseudo.name (none vs daso)."
    assert report_main([str(pair[0].path), str(pair[1].path), "--out",
                        str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "The runs differ in 1 setting: pseudo.name (none vs daso)." in out
    assert "\u0394 test R" in out and "airplane" in out
    html = (tmp_path / "cmp.html").read_text(encoding="utf-8")
    assert "differ in 1 setting" in html and "Per-class differences" in html


def test_differing_settings_beyond_group_choice(make_run):
    runs = [read_run(make_run("a", gamma_l=50)), read_run(make_run("b", gamma_l=100))]
    diff = differing_settings(runs)
    assert diff == {"dataset.gamma_l": ["50", "100"], "dataset.gamma_u": ["50", "100"]}


def test_delta_table_values(pair):
    table = delta_table(pair, ["FM", "FM+DASO"])
    col = table.headers.index("\u0394 test R FM+DASO")
    base = table.headers.index("test R FM")
    a, b = (per_class_at(r, "test", "prediction") for r in pair)
    for row, c in zip(table.rows, class_order(pair[0])):
        assert row[0] == pair[0].class_names[c]
        assert float(row[base]) == pytest.approx(100 * a.loc[c, "recall"], abs=0.006)
        assert float(row[col]) == pytest.approx(100 * (b.loc[c, "recall"] - a.loc[c, "recall"]),
                                                abs=0.006)
    assert delta_table(pair[:1], ["FM"]) is None


def test_one_run_report_has_no_delta(make_run, tmp_path):
    html, _ = build_report([make_run("x", pseudo="daso")], tmp_path / "one")
    text = html.read_text(encoding="utf-8")
    assert "Per-class differences" not in text and "DASO m\u0302" in text


def test_tail_recall_and_bands_vs_gamma(make_run, tmp_path):
    for gamma in (50, 100):
        for pseudo in ("none", "daso"):
            for seed in (0, 1):
                make_run(f"sweep/g{gamma}_{pseudo}_{seed}", gamma_l=gamma, pseudo=pseudo,
                         seed=seed, iterations=300)
    records = collect_runs([tmp_path / "sweep"], stat="final")
    run = read_run(records["path"].iloc[0])
    tail = tail_classes(run)
    assert tail == class_order(run)[-3:]
    wide = per_class_at(run, "test", "prediction")
    assert tail_recall(run, "final") == pytest.approx(100 * wide.loc[tail, "recall"].mean())
    assert records["tail_recall"].iloc[0] == pytest.approx(tail_recall(run, "final"))
    stats = aggregate(records, "tail_recall")
    assert len(stats) == 4 and (stats["n"] == 2).all()
    files = {f.name for f in write_results([tmp_path / "sweep"], tmp_path / "res")}
    assert {"tail_recall.md", "tail_recall_vs_gamma.png", "accuracy_vs_gamma.svg"} <= files


def test_final_lines_show_the_median_only_with_a_full_window():
    metrics = {"balanced_acc": 0.55, "top1": 0.6}
    short = final_accuracy_lines(metrics, [0.1, 0.2, 0.55], 20)
    assert "55.00%" in short and "median" not in short.splitlines()[0]
    assert "20.00" not in short and "needs 20 evaluations, this run had 3" in short
    full = final_accuracy_lines(metrics, [0.1] * 10 + [0.5] * 11, 20)
    assert "median of the last 20 evaluations, balanced accuracy 50.00%" in full
