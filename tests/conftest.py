"""Shared fixtures: a tiny composed config that trains in seconds on CPU."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

TINY = [
    "trainer.iterations=4", "trainer.batch_size=8", "trainer.eval_interval=2",
    "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.progress=false",
    "trainer.tensorboard=false", "device=cpu",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """compose(overrides) -> config of a tiny digits-LT run in a temporary run folder."""
    from imbssl.cli import compose

    def make(*overrides: str):
        return compose([*TINY, f"run_dir={tmp_path / 'run'}", *overrides])

    return make
