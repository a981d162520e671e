"""CTAugment through the real Trainer: the probes move the bin weights during training, and a
run resumed from a checkpoint ends exactly like the uninterrupted run (weights included)."""
from __future__ import annotations

import pytest
import torch

COMMON = ["trainer.batch_size=8", "trainer.eval_interval=6", "trainer.log_interval=3",
          "trainer.checkpoint_interval=6", "trainer.progress=false", "trainer.report=false",
          "trainer.tensorboard=false", "device=cpu", "pseudo=none", "dataset.n1=30",
          "dataset.m1=60", "algorithm.strong_augment=ctaugment"]
CASES = {"fixmatch": ["algorithm=fixmatch", "algorithm.threshold=0.3"],
         "remixmatch": ["algorithm=remixmatch", "algorithm.rampup_ratio=0"]}


def train(run_dir, iterations: int, extra: list[str], resume: bool = False):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    GlobalHydra.instance().clear()
    cfg = compose([*COMMON, *extra, f"trainer.iterations={iterations}", f"run_dir={run_dir}",
                   f"resume={'true' if resume else 'false'}"])
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def checkpoint(run_dir, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"ckpt_{step:08d}.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_is_exact_with_ctaugment(tmp_path, name):
    straight = tmp_path / "straight"
    trainer = train(straight, 12, CASES[name])
    assert callable(trainer.algo.unlabeled_views[1])  # the strong view is CTAugment's
    train(tmp_path / "resumed", 6, CASES[name])
    train(tmp_path / "resumed", 12, CASES[name], resume=True)
    a, b = checkpoint(straight, 12), checkpoint(tmp_path / "resumed", 12)
    weights = a["algorithm"]["ctaugment.weights"]
    assert (weights < 1.0).sum() > 10  # 12 steps of 8 probes moved many bins
    for part in ("model", "ema", "algorithm"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)
    assert torch.equal(a["aug_generator"], b["aug_generator"])
