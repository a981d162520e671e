"""Tiny in-process digits-LT runs of the issue-19 comparators (shared by their tests)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from imbssl.cli import main

TINY = ["dataset=digits_lt", "trainer.iterations=4", "trainer.batch_size=8",
        "trainer.eval_interval=2", "trainer.log_interval=2", "trainer.checkpoint_interval=4",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
        "device=cpu"]
RUN_FILES = ("config.yaml", "meta.json", "metrics.jsonl", "per_class.csv", "summary.json",
             "confusion_test.npy")


def tiny_run(run_dir: Path, *overrides: str) -> list[dict]:
    """``imbssl train`` on digits-LT for 4 steps; checks the run folder is complete and every
    logged loss is finite; returns the metrics rows."""
    assert main(["train", *TINY, f"run_dir={run_dir}", *overrides]) == 0
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(math.isfinite(v) for r in train for k, v in r.items()
                         if k.startswith("loss/"))
    assert any(r["split"] == "pseudo" for r in rows) or "algorithm=supervised" in overrides
    return rows


def train_steps_in_process(run_dir: Path, iterations: int, resume: bool,
                           overrides: list[str]) -> None:
    """``Trainer(compose(overrides)).run()`` for ``iterations`` steps into ``run_dir``
    (``resume=true``: continue its last checkpoint), as the exact-resume tests train the
    straight and the interrupted run."""
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    GlobalHydra.instance().clear()
    Trainer(compose([*overrides, f"trainer.iterations={iterations}", f"run_dir={run_dir}",
                     f"resume={'true' if resume else 'false'}"])).run()
