"""Shared fixtures: a tiny small_cnn setup on random 1x8x8 data and a hook-recording refiner."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.models import EMA
from imbssl.models.base import Network
from imbssl.models.small_cnn import SmallCNN
from imbssl.pseudo import IdentityRefiner

NUM_CLASSES = 3
NUM_LABELED = 20
BATCH = 8


class StubRefiner(IdentityRefiner):
    """Identity refinement that records every hook call and adds a small feature loss."""

    needs_labeled_features = True

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.seen: dict[str, Tensor] = {}

    def update_labeled(self, features, labels):
        self.calls.append("update_labeled")
        self.seen["labeled_features"] = features

    def refine(self, probs, features_weak, step):
        self.calls.append("refine")
        self.seen["probs"], self.seen["features_weak"] = probs, features_weak
        return probs

    def observe(self, pseudo_labels):
        self.calls.append("observe")
        self.seen["observed"] = pseudo_labels

    def extra_loss(self, features_weak, features_strong, step):
        self.calls.append("extra_loss")
        self.seen["strong_requires_grad"] = features_strong.requires_grad
        loss = 0.01 * (features_strong.float() - features_weak.detach().float()).pow(2).mean()
        return loss, {"loss/stub": loss.detach()}

    def pseudo_logs(self):
        self.calls.append("pseudo_logs")
        return {"pseudo/semantic": self.seen["observed"].clone()}


def make_setup(name: str, refiner: nn.Module | None = None, seed: int = 0, **overrides):
    """(algorithm, model, ema, optimizer, labeled labels) for algorithm ``name``."""
    torch.manual_seed(seed)
    cls = get_algorithm(name)
    cfg = cls.Config(**overrides)
    labeled_labels = torch.arange(NUM_LABELED) % NUM_CLASSES
    backbone = SmallCNN(NUM_CLASSES, in_channels=1)
    model = Network(backbone, cls.make_heads(cfg, backbone.feat_dim, NUM_CLASSES)).train()
    algo = cls(cfg, NUM_CLASSES, backbone.feat_dim, labeled_labels, refiner)
    ema = EMA(model, 0.999)
    opt = torch.optim.SGD(list(model.parameters()) + list(algo.parameters()), lr=0.03,
                          momentum=0.9)
    return algo, model, ema, opt, labeled_labels


def make_batch(algo, labeled_labels: Tensor) -> Batch:
    idx_lb = torch.randperm(NUM_LABELED)[:BATCH]
    n_ulb = BATCH * algo.cfg.uratio
    views = [torch.randn(n_ulb, 1, 8, 8) for _ in algo.unlabeled_views]
    batch = Batch(torch.randn(BATCH, 1, 8, 8), labeled_labels[idx_lb], idx_lb, views,
                  torch.arange(n_ulb))
    batch.x_lb_views = [torch.randn(BATCH, 1, 8, 8) for _ in algo.labeled_views]
    return batch


def train_steps(algo, model, ema, opt, labeled_labels, steps: int = 2, total_steps: int = 10):
    """Run ``steps`` SGD steps; return the list of (loss, logs)."""
    out = []
    for step in range(steps):
        batch = make_batch(algo, labeled_labels)
        loss, logs = algo.step(batch, StepState(step, total_steps, model, ema.model))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        out.append((loss.detach(), logs, batch))
    return out


@pytest.fixture
def stub_refiner():
    return StubRefiner()
