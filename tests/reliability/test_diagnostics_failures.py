"""An evaluation or report failure (a plot that cannot be drawn) never ends training: it is
one warning line on stderr, listed under ``missing`` in summary.json, and the report says
what is missing."""
from __future__ import annotations

import json

import imbssl.engine.periodic as periodic_module
import imbssl.engine.trainer as trainer_module
from imbssl.engine.checkpoint import list_checkpoints


def test_failed_evaluation_is_noted_and_training_goes_on(tiny_cfg, monkeypatch, capsys):
    real = periodic_module.confusion_to_metrics
    calls = []

    def fails_at_step_2(conf):
        calls.append(1)
        if len(calls) == 1:  # the first evaluation (step 2, test split)
            raise ValueError("metrics cannot be computed")
        return real(conf)

    monkeypatch.setattr(periodic_module, "confusion_to_metrics", fails_at_step_2)
    trainer = trainer_module.Trainer(tiny_cfg("trainer.report=false", "pseudo=none"))
    summary = trainer.run()
    assert summary["status"] == "finished" and summary["step"] == 4
    assert summary["missing"] == ["evaluation at step 2 failed (ValueError: metrics cannot be "
                                  "computed)"]
    err = capsys.readouterr().err
    assert "warning: evaluation at step 2 failed" in err and "training goes on" in err
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows if r["split"] == "test"] == [4]
    assert [s for s, _ in list_checkpoints(trainer.run_dir / "checkpoints")] == [2, 4]
    saved = json.loads((trainer.run_dir / "summary.json").read_text())
    assert saved["status"] == "finished" and saved["missing"] == summary["missing"]


def test_plot_that_cannot_be_drawn_leaves_a_report_saying_so(tiny_cfg, monkeypatch, capsys):
    import imbssl.diagnostics.plots as plots

    def broken(*_args, **_kwargs):
        raise RuntimeError("cannot draw the confusion matrix")

    monkeypatch.setattr(plots, "plot_confusion", broken)
    trainer = trainer_module.Trainer(tiny_cfg("trainer.report=true", "pseudo=none"))
    summary = trainer.run()
    assert summary["status"] == "finished"
    assert len(summary["missing"]) == 1 and "report at step 4 failed" in summary["missing"][0]
    assert "cannot draw the confusion matrix" in capsys.readouterr().err
    for name in ("report.md", "report.html"):
        text = (trainer.run_dir / name).read_text()
        assert "Missing from this report" in text and "cannot draw the confusion matrix" in text
    assert "balanced" in (trainer.run_dir / "report.md").read_text().lower()  # tables are there
    saved = json.loads((trainer.run_dir / "summary.json").read_text())
    assert saved["missing"] == summary["missing"]
