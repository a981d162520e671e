"""The worked example of docs/contributing.md is a test: the small method of
examples/soft_pseudo_label.py registers itself, its YAML fits its config schema, its loss
equals reference values (the parity pattern), and it trains on digits-LT through the real
trainer, alone and with DASO."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import imbssl.algorithms as algorithms
from imbssl.engine.config import compose, to_object
from imbssl.engine.trainer import Trainer

EXAMPLES = Path(__file__).parents[2] / "examples"
YAML = EXAMPLES / "configs" / "algorithm" / "soft_pl.yaml"
SHORT = ["dataset=digits_lt", "trainer.iterations=6", "trainer.batch_size=8",
         "trainer.eval_interval=3", "trainer.log_interval=3", "trainer.checkpoint_interval=6",
         "trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
         "device=cpu"]


@pytest.fixture
def example(monkeypatch):
    """examples/soft_pseudo_label.py imported, registered in a copy of the registry (so the
    rest of the test session sees the registered algorithms only)."""
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms.registry()))
    spec = importlib.util.spec_from_file_location("soft_pseudo_label", EXAMPLES /
                                                  "soft_pseudo_label.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def example_config(*overrides: str):
    """The composed config of a short digits-LT run with algorithm = the example's YAML."""
    node = OmegaConf.load(YAML)
    node.pop("defaults")
    cfg = compose([*SHORT, *overrides])
    with open_dict(cfg):
        cfg.algorithm = node
    return cfg


def test_the_yaml_fits_the_schema(example):
    cfg = to_object(OmegaConf.load(YAML).copy(), None)
    cfg.pop("defaults")
    typed = to_object(cfg, example.SoftPseudoLabelConfig)
    assert typed == example.SoftPseudoLabelConfig()  # the YAML states the defaults
    assert algorithms.get_algorithm("soft_pl") is example.SoftPseudoLabel


def test_loss_equals_the_reference_values(example):
    """Parity pattern: reference values computed once by an independent implementation
    (here numpy; for a published method: its official code, with repository, file and
    commit named beside the values)."""
    logits_w = torch.tensor([[0.3772, -0.3963, 1.9213], [0.3147, -1.607, 1.0848],
                             [3.912, 2.8412, -2.1112], [-3.7963, -1.8698, 0.124]],
                            dtype=torch.float64)
    logits_s = torch.tensor([[-2.325, -0.2188, -1.2459], [-0.7323, -0.5443, -0.3163],
                             [0.4116, 1.0425, -0.1285], [1.3665, -0.6652, 0.3515]],
                            dtype=torch.float64)
    probs = torch.softmax(logits_w, dim=-1)
    target = example.sharpen(probs, 0.5)
    mask = (probs.max(dim=-1).values >= 0.7).double()
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(target[0], torch.tensor(
        [0.0431957223621702, 0.009195750461209577, 0.9476085271766201], dtype=torch.float64))
    loss = example.soft_unlabeled_loss(logits_s, target, mask)
    assert float(loss) == pytest.approx(1.0164769226814228, rel=1e-6)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_the_example_trains_on_digits(example, tmp_path, pseudo):
    extra = ["pseudo.warmup_iters=2"] if pseudo == "daso" else []
    cfg = example_config(f"pseudo={pseudo}", *extra, f"run_dir={tmp_path / 'run'}")
    trainer = Trainer(cfg)
    assert isinstance(trainer.algo, example.SoftPseudoLabel)
    summary = trainer.run()
    assert summary["status"] == "finished" and summary["step"] == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(math.isfinite(r["loss/total"]) for r in train)
    assert any(r["split"] == "pseudo" for r in rows)  # its pseudo/... logs are tracked
    assert 0.0 <= summary["final"]["test/balanced_acc"] <= 1.0
