"""The report says in words what its plots show when it matters (issue 28): a mask ratio
that collapses after the warm-up, classes never predicted, which pseudo-labels a figure
counts, a balanced test set; and its figures are built so that they read the same way."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

import imbssl.diagnostics.plots as plots
from imbssl.diagnostics.findings import findings
from imbssl.diagnostics.logfile import RunLog, read_run
from imbssl.diagnostics.metrics import classification_metrics, per_class_rows
from imbssl.diagnostics.report import build_report, delta_table

from .conftest import CIFAR10


def _collapse_mask_after(run: Path, warmup: int) -> None:
    """Give the run a refiner warm-up and a mask ratio near zero after it."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["pseudo"]["warmup_iters"] = warmup
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "mask/ratio" in row and row["step"] > warmup:
            row["mask/ratio"] = 0.004
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _never_predict(run: Path, source: str, kind: str, cls: int) -> None:
    """Overwrite the last per-class rows of source/kind with predictions that never say
    class ``cls`` (every image of it is called class 0)."""
    step = int(json.loads((run / "summary.json").read_text())["step"])
    y = np.repeat(np.arange(10), 50)
    pred = np.where(y == cls, 0, y)
    rows = per_class_rows(step, source, kind, "all", classification_metrics(y, pred, 10),
                          CIFAR10)
    RunLog(run).append_per_class(rows)


def test_mask_collapse_after_warmup_is_said(make_run):
    run = make_run("daso", pseudo="daso")
    _collapse_mask_after(run, 300)
    text = " ".join(findings([read_run(run)], ["fixmatch+DASO"]))
    assert "fixmatch+DASO: the mask ratio falls to near zero after the warm-up " \
           "(pseudo.warmup_iters = 300)" in text
    assert "a median of 0.4%" in text
    plain = make_run("plain")  # no warm-up, mask ratio 50-90%: nothing said
    assert not any("mask ratio" in s for s in findings([read_run(plain)], ["fixmatch"]))


def test_class_never_predicted_is_named(make_run):
    run = make_run("a")
    _never_predict(run, "test", "prediction", 9)
    text = findings([read_run(run)], ["fixmatch"])
    assert "fixmatch never predicts truck at its last test evaluation: test recall 0, " \
           "precision undefined." in text


def test_pseudo_label_figures_say_what_they_count(make_run, tmp_path):
    run = make_run("daso", pseudo="daso")
    sentence = next(s for s in findings([read_run(run)], ["d"]) if "Pseudo-label" in s)
    assert "count all pseudo-labels (every unlabeled image, confident or not)" in sentence
    assert "only the confident ones (mask = 1) enter the unlabeled loss" in sentence
    assert "Confident in the last interval: d " in sentence
    html = build_report([run], tmp_path / "r")[0].read_text()
    assert "Pseudo-labels (final, all, confident or not)" in html
    assert "recall of all pseudo-labels (confident or not) over training" in html


def test_balanced_test_set_is_one_panel_and_said(make_run, tmp_path):
    run = make_run("a")
    text = findings([read_run(run)], ["a"])
    assert any("top-1 accuracy equals balanced accuracy" in s for s in text)
    md = build_report([run], tmp_path / "r")[1].read_text()
    assert "final top-1 = bal. acc" in md
    assert "Accuracy over iterations (top-1 = balanced accuracy: the evaluation set is " \
           "balanced)" in md


def test_delta_precision_shows_the_value_where_the_baseline_never_predicted(make_run):
    base, other = make_run("a"), make_run("b", pseudo="daso")
    _never_predict(base, "pseudo", "linear", 8)  # the baseline's pseudo-labels: no ship
    runs = [read_run(base), read_run(other)]
    table = delta_table(runs, ["fixmatch", "fixmatch+DASO"])
    col = table.headers.index("\u0394 pseudo P fixmatch+DASO")
    ship = next(row for row in table.rows if row[0] == "ship")
    assert ship[col].endswith("\u2020") and ship[col] != "\u2013"
    assert "fixmatch never predicted the class" in table.caption


def test_heatmap_panels_label_the_same_iterations(make_run, tmp_path, monkeypatch):
    figures = []

    def keep(fig, out_dir, stem):
        figures.append(fig)
        return tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"

    monkeypatch.setattr(plots, "save_figure", keep)
    run = read_run(make_run("daso", pseudo="daso", iterations=2000))
    assert plots.plot_pseudo_heatmap(run, "d", tmp_path, "h") is not None
    panels = [ax for ax in figures[0].axes if ax.get_title()]  # colour bar has no title
    labels = [[t.get_text() for t in ax.get_xticklabels()] for ax in panels]
    assert len(panels) == 3 and labels[0] and all(lab == labels[0] for lab in labels)
