"""Mean Teacher (Tarvainen and Valpola, NeurIPS 2017), the DASO paper's baseline, following the
official DASO ``lib/algorithm/mean_teacher.py`` and ``configs/*/meanteacher.yaml``.

The student (online model) sees the labeled batch and one weak view of the unlabeled batch in
one forward pass; the teacher is the EMA model, without gradient, on a second weak view (the
official transform gives two weak views: ``DATASET.TRANSFORM.STRONG_AUG`` is False). Loss:
cross-entropy on the labeled batch plus ``lambda_u`` times a linear ramp (over
``rampup_ratio`` of the run) times the mean squared error between the student's and the
teacher's softmax (official ``MSELoss``, mean over images and classes).

Pseudo-labels: the teacher's softmax is the consistency target; ``pseudo/linear`` is its
argmax. A refiner (DASO, DARP) refines that target; as in the official ``APPLY_DASO`` branch,
DASO's semantic pseudo-label comes from the teacher's features of its view and there is no
semantic alignment loss (the official branch only adds ``loss_cls`` and ``loss_cons``), so
``refiner.extra_loss`` is not called. Every image enters the loss (``pseudo/mask`` is 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.algorithms.ops import linear_rampup


@dataclass
class MeanTeacherConfig(AlgorithmConfig):
    name: str = "meanteacher"
    uratio: int = 1  # official SOLVER.UNLABELED_BATCH_RATIO default 1
    lambda_u: float = 50.0  # official configs/*/meanteacher.yaml UNLABELED_LOSS_WEIGHT
    rampup_ratio: float = 0.4  # official CONS_RAMPUP_ITERS_RATIO 0.4, schedule linear


@register("meanteacher")
class MeanTeacher(Algorithm):
    """Student-teacher consistency: MSE between softmaxes, the teacher an EMA of the student."""

    Config = MeanTeacherConfig
    unlabeled_views = ("weak", "weak")  # (student view, teacher view)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        x_student, x_teacher = batch.x_ulb
        self.feed_refiner(batch, state)
        (logits_x, _), (logits_u, _) = forward_all(state.model, batch.x_lb, x_student)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)

        with torch.no_grad():
            teacher = state.ema_model(x_teacher)
            target = torch.softmax(teacher.logits.detach().float(), dim=-1)
            linear = target.argmax(dim=-1)
            target = self.refiner.refine(target, teacher.features.detach(), state.step)
            pseudo = target.argmax(dim=-1)
        self.refiner.observe(pseudo)

        # consistency: ||softmax(student) - softmax(teacher)||^2, mean over images and classes
        loss_u = F.mse_loss(torch.softmax(logits_u.float(), dim=-1), target)
        ramp = linear_rampup(state.step, state.total_steps, cfg.rampup_ratio)
        loss = loss_x + cfg.lambda_u * ramp * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": torch.ones_like(target[:, 0])}
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
