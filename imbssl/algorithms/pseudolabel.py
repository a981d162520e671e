"""Pseudo-Label (Lee, ICML 2013 workshop), the DASO paper's baseline, following the official
DASO ``lib/algorithm/pseudo_label.py`` and ``configs/*/pseudolabel.yaml``.

One forward pass over the labeled batch and one weak view of the unlabeled batch; the hard
pseudo-label is the argmax of the model's own (detached) softmax on that same view, kept where
its confidence reaches ``threshold``; loss: labeled cross-entropy plus ``lambda_u`` times a
linear ramp (over ``rampup_ratio`` of the run) times the masked cross-entropy averaged over the
unlabeled batch (official ``avg_factor = batch size``).

A refiner (DASO, DARP) refines the probabilities before the threshold, as in FixMatch. There is
no second view, so DASO's semantic alignment loss (weak vs strong features) does not apply:
``refiner.extra_loss`` is not called (the official code has no Pseudo-Label + DASO variant).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.algorithms.fixmatch import fixmatch_mask
from imbssl.algorithms.ops import linear_rampup, weak_view_probs


@dataclass
class PseudoLabelConfig(AlgorithmConfig):
    name: str = "pseudolabel"
    uratio: int = 1  # official configs/*/pseudolabel.yaml SOLVER.UNLABELED_BATCH_RATIO 1
    threshold: float = 0.95  # official ALGORITHM.CONFIDENCE_THRESHOLD 0.95
    lambda_u: float = 1.0  # official MODEL.LOSS.UNLABELED_LOSS_WEIGHT 1.0
    rampup_ratio: float = 0.4  # official CONS_RAMPUP_ITERS_RATIO default 0.4, schedule linear


@register("pseudolabel")
class PseudoLabel(Algorithm):
    """Confident hard pseudo-labels from the model's own prediction on the same weak view."""

    Config = PseudoLabelConfig
    unlabeled_views = ("weak",)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.feed_refiner(batch, state)
        (logits_x, _), (logits_u, feats_u) = forward_all(state.model, batch.x_lb, batch.x_ulb[0])
        loss_x = self.labeled_loss(logits_x, batch.y_lb)

        with torch.no_grad():
            probs, linear = weak_view_probs(logits_u, feats_u, state.step, self.refiner)
            mask, pseudo = fixmatch_mask(probs, cfg.threshold)  # 1(max p >= tau), argmax p
        self.refiner.observe(pseudo)

        loss_u = (F.cross_entropy(logits_u.float(), pseudo, reduction="none") * mask).mean()
        ramp = linear_rampup(state.step, state.total_steps, cfg.rampup_ratio)
        loss = loss_x + cfg.lambda_u * ramp * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": mask}
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
