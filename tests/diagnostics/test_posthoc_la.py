"""Every evaluation logs the post-hoc logit-adjusted accuracy beside the plain one, from the
same forward pass (official DASO: ``top1_la`` in ``eval_loop``)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from imbssl.diagnostics.summary_stats import evaluation_scores
from imbssl.engine.evaluate import labeled_log_prior, measured_confusions

# Reference values from running the official function once: ytaek-oh/daso, commit
# 3541a6c452f895056f5fdac440b5d0c557dea9f0, lib/algorithm/base_algorithm.py,
# BaseAlgorithm.eval_loop (outputs_la = outputs - self.p_data.view(1, -1).log()) on a model
# returning the logits below, p_data = COUNTS / COUNTS.sum(), the targets below (torch 2.x;
# its lib/models/losses/accuracy.py needed .reshape for .view on a non-contiguous tensor).
OFFICIAL_TOP1, OFFICIAL_TOP1_LA = 8.333333015441895, 25.0  # in %
PLAIN_PRED = [4, 4, 1, 5, 5, 0, 5, 3, 2, 5, 4, 5]
TARGETS = [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]
COUNTS = [60, 30, 15, 8, 4, 2]


class FixedLogits(torch.nn.Module):
    """Returns row ``x`` of fixed logits; counts its forward passes."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x):
        self.calls += 1
        return type("Out", (), {"logits": self.logits[x.long().flatten()]})


def _seeded_logits():
    torch.manual_seed(0)
    return torch.randn(12, 6) * 2


def _labeled(counts):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


def _measure(model, predict, counts, batch_size=5):
    images = torch.arange(12, dtype=torch.uint8).view(-1, 1)
    return measured_confusions(model, images, torch.tensor(TARGETS), lambda x: x, 6,
                               batch_size, contextlib.nullcontext, predict,
                               _labeled(counts)).numpy()


def test_posthoc_la_equals_the_official_top1_la():
    logits = _seeded_logits()
    assert logits.argmax(1).tolist() == PLAIN_PRED  # the same tensors as the reference run
    model = FixedLogits(logits)
    confs = _measure(model, lambda out: out.logits, COUNTS)
    scores = evaluation_scores(confs)
    assert 100 * scores["top1"] == pytest.approx(OFFICIAL_TOP1, abs=1e-5)
    assert 100 * scores["top1_posthoc_la"] == pytest.approx(OFFICIAL_TOP1_LA, abs=1e-5)
    assert set(scores) == {"top1", "balanced_acc", "top1_posthoc_la",
                           "balanced_acc_posthoc_la"}
    assert model.calls == 3  # one forward pass per batch of 5 for both predictions


def test_posthoc_la_adjusts_the_classifier_logits_not_the_evaluated_prediction():
    """A method that evaluates another prediction keeps it as the plain metric; the LA
    metric adjusts the classifier's logits (as the official code adjusts the model output)."""
    logits = _seeded_logits()
    confs = _measure(FixedLogits(logits), lambda out: -out.logits, COUNTS)
    expected = (logits - torch.tensor(COUNTS, dtype=torch.float).div(sum(COUNTS)).log())
    assert confs[1].sum(axis=0).tolist() == torch.bincount(
        expected.argmax(1), minlength=6).tolist()
    assert confs[0].sum(axis=0).tolist() == torch.bincount(
        (-logits).argmax(1), minlength=6).tolist()


def test_no_posthoc_la_when_a_class_has_no_labeled_image():
    assert labeled_log_prior(_labeled([3, 0, 1]), 3) is None
    confs = _measure(FixedLogits(_seeded_logits()), lambda out: out.logits, [5, 4, 3, 2, 1, 0])
    assert confs.shape == (1, 6, 6) and "top1_posthoc_la" not in evaluation_scores(confs)


def test_every_run_logs_posthoc_la_in_metrics_and_summary(tiny_cfg):
    from imbssl.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg("trainer.summary_last=2", "dataset.num_valid_per_class=2"))
    with contextlib.redirect_stdout(None):
        trainer.run()
    rows = [json.loads(line) for line in
            (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {"top1", "balanced_acc", "top1_posthoc_la", "balanced_acc_posthoc_la"}
    for split in ("test", "valid"):
        evals = [r for r in rows if r["split"] == split]
        assert evals and all(keys <= set(r) for r in evals), split
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    for block in ("final", "median_last2"):
        assert {"test/balanced_acc_posthoc_la", "test/top1_posthoc_la",
                "valid/balanced_acc_posthoc_la"} <= set(summary[block])
