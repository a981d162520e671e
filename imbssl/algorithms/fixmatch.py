"""FixMatch (Sohn et al., NeurIPS 2020) with the hooks that let DASO refine its pseudo-labels.

Pseudo-label pipeline on the weak view (order of DASO's ``daso.py``/``fixmatch.py``):
softmax of the detached logits -> optional distribution alignment -> refiner (DASO blend)
-> confidence mask ``max p >= threshold`` and hard label ``argmax p`` of the refined probs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.data.ctaugment import build_ctaugment, with_ctaugment
from imbssl.pseudo.base import add_extra_loss, hard_labels
from imbssl.pseudo.dist_align import build_dist_align


@dataclass
class FixMatchConfig(AlgorithmConfig):
    name: str = "fixmatch"
    uratio: int = 2  # mu (DASO protocol; FixMatch paper: 7)
    threshold: float = 0.95  # tau (FixMatch paper, CIFAR)
    lambda_u: float = 1.0  # (FixMatch paper)
    dist_align: str = "none"  # none | labeled | uniform (DASO FixMatch baseline: off)
    dist_align_window: int = 128  # batches in p~(y) (ReMixMatch / DASO)
    strong_augment: str = "randaugment"  # randaugment | ctaugment (FixMatch paper: both)


def fixmatch_mask(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(float mask 1(max p >= tau), hard label argmax p) of (B, K) probabilities."""
    conf, labels = hard_labels(probs)
    return conf.ge(threshold).float(), labels


@register("fixmatch")
class FixMatch(Algorithm):
    """Weak-view hard pseudo-label with a confidence threshold, cross-entropy on the strong view."""

    Config = FixMatchConfig
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: FixMatchConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        self.dist_align = build_dist_align(cfg.dist_align, num_classes, self.labeled_prior,
                                           cfg.dist_align_window)
        self.ctaugment = build_ctaugment(cfg.strong_augment)  # its weights: a buffer
        self.unlabeled_views = with_ctaugment(type(self).unlabeled_views, self.ctaugment)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.feed_refiner(batch, state)
        probe_logs = self.probe_ctaugment(batch, state)
        (logits_x, _), (logits_w, feats_w), (logits_s, feats_s) = forward_all(
            state.model, batch.x_lb, *batch.x_ulb)
        loss_x = F.cross_entropy(self.labeled_logits(logits_x).float(), batch.y_lb)  # l_s (+LA)

        with torch.no_grad():
            probs = torch.softmax(logits_w.detach().float(), dim=-1)  # q_b = p_m(y | alpha(u_b))
            linear = probs.argmax(dim=-1)
            if self.dist_align is not None:
                probs = self.dist_align(probs)
            probs = self.refiner.refine(probs, feats_w.detach(), state.step)
            mask, pseudo = fixmatch_mask(probs, cfg.threshold)  # 1(max q_b >= tau), argmax q_b
        self.refiner.observe(pseudo)

        # l_u = 1/(mu B) sum 1(max q_b >= tau) H(q^_b, p_m(y | A(u_b)))  (FixMatch Sec. 3)
        loss_u = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": mask, **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
