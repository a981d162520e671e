"""Two training steps of every registered algorithm, with and without DASO; resume via CLI."""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    precision_recall_fscore_support,
)
from sklearn.metrics import (
    confusion_matrix as sk_confusion,
)

from imbssl.algorithms import get_algorithm, registry
from imbssl.diagnostics.metrics import confusion_to_metrics
from imbssl.engine.evaluate import confusion_matrix
from imbssl.engine.trainer import Trainer
from imbssl.errors import UserError


@pytest.mark.parametrize("name", sorted(registry()))
@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_two_steps_of_every_algorithm(tiny_cfg, name, pseudo):
    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    if get_algorithm(name).needs_validation:  # DARP's estimation run
        extra.append("dataset.num_valid_per_class=2")
    cfg = tiny_cfg(f"algorithm={name}", f"pseudo={pseudo}", *extra)
    if pseudo == "daso" and not get_algorithm(name).unlabeled_views:
        with pytest.raises(UserError, match="add pseudo=none"):  # no "supervised+DASO" runs
            Trainer(cfg)
        return
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(2):
        trainer.train_step()
    scalars = trainer.flush_scalars()
    assert trainer.step_count == 2
    assert math.isfinite(scalars["loss/total"])
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert changed, "the optimizer step did not change any weight"


def test_evaluation_metrics_equal_sklearn():
    """The engine's device confusion matrix + metrics equal scikit-learn on known predictions."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, size=200))
    y_pred[y_pred == 3] = 2  # class 3 is never predicted

    class Fixed(torch.nn.Module):
        def forward(self, x):
            logits = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 4).float()
            return type("Out", (), {"logits": logits})

    images = torch.as_tensor(y_pred, dtype=torch.uint8).view(-1, 1, 1, 1)
    conf = confusion_matrix(Fixed(), images, torch.as_tensor(y_true), lambda x: x.float(), 4, 64,
                            contextlib.nullcontext).numpy()
    assert (conf == sk_confusion(y_true, y_pred, labels=range(4))).all()
    m = confusion_to_metrics(conf)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    assert m["top1"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    np.testing.assert_allclose(m["precision"], p)
    np.testing.assert_allclose(m["recall"], r)
    np.testing.assert_allclose(m["f1"], f)
    np.testing.assert_array_equal(m["support"], s)
    # the algorithm's eval_logits decides what is argmaxed: here, the next class
    shifted = confusion_matrix(Fixed(), images, torch.as_tensor(y_true), lambda x: x.float(), 4,
                               64, contextlib.nullcontext,
                               predict=lambda out: out.logits.roll(1, dims=1)).numpy()
    assert (shifted == sk_confusion(y_true, (y_pred + 1) % 4, labels=range(4))).all()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imbssl", *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow  # subprocess / multi-process training: `pytest -m slow`
def test_resume_continues_from_checkpoint(tmp_path):
    run = tmp_path / "run"
    common = [f"run_dir={run}", "trainer.batch_size=8", "trainer.eval_interval=10",
              "trainer.log_interval=10", "trainer.checkpoint_interval=10",
              "trainer.progress=false", "device=cpu", "pseudo.warmup_iters=20"]
    first = run_cli("train", "trainer.iterations=30", *common)
    assert first.returncode == 0, first.stderr
    again = run_cli("train", "trainer.iterations=30", *common)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    second = run_cli("train", "trainer.iterations=60", "resume=true", *common)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "at step 30" in second.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    test_steps = [r["step"] for r in rows if r["split"] == "test"]
    assert test_steps == [10, 20, 30, 40, 50, 60]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 60
