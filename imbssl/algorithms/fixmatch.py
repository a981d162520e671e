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
from imbssl.algorithms.ops import weak_view_probs
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

    def forward_views(self, batch: Batch, state: StepState) -> tuple:
        """Feed the refiner, probe CTAugment, then one forward over the labeled, weak and
        strong images: (CTAugment probe logs, (logits, features) of each of the three)."""
        self.feed_refiner(batch, state)
        probe_logs = self.probe_ctaugment(batch, state)
        return probe_logs, *forward_all(state.model, batch.x_lb, *batch.x_ulb)

    def weak_view_probs(self, logits_w: Tensor, feats_w: Tensor, step: int
                        ) -> tuple[Tensor, Tensor]:
        """(weak-view probabilities after distribution alignment and the refiner, argmax of
        the raw ones): ``ops.weak_view_probs`` with this algorithm's aligner and refiner."""
        return weak_view_probs(logits_w, feats_w, step, self.refiner, self.dist_align)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        probe_logs, (logits_x, _), (logits_w, feats_w), (logits_s, feats_s) = \
            self.forward_views(batch, state)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)  # l_s (+LA)

        with torch.no_grad():
            # q_b = p_m(y | alpha(u_b)), aligned and refined; linear = argmax of the raw q_b
            probs, linear = self.weak_view_probs(logits_w, feats_w, state.step)
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
