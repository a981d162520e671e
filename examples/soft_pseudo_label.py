"""Soft Pseudo-Label: the worked example of docs/contributing.md, a complete small method.

The weak view's prediction, sharpened with temperature T and kept where its confidence
reaches ``threshold``, is the soft target of the strong view (a FixMatch with soft targets):

    q = Sharpen(p(y | weak), T) = p^(1/T) / sum_k p_k^(1/T)
    L = CE(y_lb, f(x_lb)) + lambda_u * 1/B_u * sum_b 1(max p_b >= tau) * H(q_b, f(strong_b))

In the repository the file would be ``imbssl/algorithms/soft_pl.py`` (found by the registry
when the package is imported) with its YAML at ``imbssl/configs/algorithm/soft_pl.yaml``;
here both live in ``examples/`` and tests/examples/test_contributing_example.py registers it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all


@dataclass
class SoftPseudoLabelConfig(AlgorithmConfig):
    name: str = "soft_pl"
    uratio: int = 2  # unlabeled images per labeled image
    threshold: float = 0.95  # tau: confidence a pseudo-label needs
    temperature: float = 0.5  # T of the sharpening
    lambda_u: float = 1.0  # weight of the unlabeled loss


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """p^(1/T) / sum_k p_k^(1/T), row by row."""
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True)


def soft_unlabeled_loss(logits_strong: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """1/B sum_b mask_b * H(target_b, softmax(logits_strong_b))."""
    per_image = -(target * F.log_softmax(logits_strong.float(), dim=-1)).sum(dim=-1)
    return (per_image * mask).mean()


@register("soft_pl")
class SoftPseudoLabel(Algorithm):
    """Sharpened soft pseudo-labels of the weak view train the strong view."""

    Config = SoftPseudoLabelConfig
    unlabeled_views = ("weak", "strong")

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.feed_refiner(batch, state)  # DASO's queues (a no-op without a refiner)
        (logits_x, _), (logits_w, feats_w), (logits_s, feats_s) = forward_all(
            state.model, batch.x_lb, *batch.x_ulb)
        loss_x = F.cross_entropy(self.labeled_logits(logits_x).float(), batch.y_lb)
        with torch.no_grad():
            probs = torch.softmax(logits_w.float(), dim=-1)
            linear = probs.argmax(dim=-1)
            probs = self.refiner.refine(probs, feats_w.detach(), state.step)
            conf, pseudo = probs.max(dim=-1)
            mask = (conf >= cfg.threshold).float()
            target = sharpen(probs, cfg.temperature)
        self.refiner.observe(pseudo)
        loss_u = soft_unlabeled_loss(logits_s, target, mask)
        loss = loss_x + cfg.lambda_u * loss_u
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        if extra is not None:  # DASO's semantic alignment loss
            loss = loss + extra
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": mask, **extra_logs, **self.refiner.pseudo_logs()}
        return loss, logs
