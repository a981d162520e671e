"""MixMatch (Berthelot et al., NeurIPS 2019), as configured by DASO's LT protocol.

Batch norm: the guess pass runs on the two weak views together, and the MixUp pass runs ONE
forward over the concatenated mixed batch [labeled, weak 1, weak 2]. The official code and DASO
interleave labeled/unlabeled chunks across separate forward passes only so that every pass's
batch-norm statistics see both kinds of data; a single concatenated pass gives BN exactly that
(statistics of the whole mixed batch) without the swapping, so no interleaving is needed.

DASO follows the official MixMatch variant (github.com/ytaek-oh/daso,
``lib/algorithm/mixmatch.py`` with ``ALGORITHM.MIXMATCH.APPLY_DASO``):

* **blending only, no semantic alignment loss.** The official variant reads
  ``PSA_LOSS_WEIGHT`` but never adds a ``loss_assign`` term (only ``loss_cls`` and the ramped
  ``loss_cons``); MixMatch has no strong view for the alignment loss to pull towards the weak
  one. So ``refiner.extra_loss`` is never called here and ``pseudo.align_weight`` has no effect
  with ``algorithm=mixmatch``.
* **the semantic pseudo-label comes from the FIRST augmentation's features** (the online
  model's, without gradient: ``ul_feat1 = self.model(ul_images1, return_features=True)`` under
  ``torch.no_grad``).
* **the blend applies to the sharpened average of the K=2 predictions**:
  ``p = (softmax_1 + softmax_2) / 2``, ``Sharpen(p, T)``, then
  ``(1 - v[k]) * targets + v[k] * q_semantic`` with ``k`` = argmax of the sharpened targets;
  the blended targets enter MixUp for both weak views and their argmax is the pseudo-label
  pushed into the m_hat histogram (every image, no confidence filter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.algorithms.ops import linear_rampup, mixup, one_hot, sharpen, soft_cross_entropy


@dataclass
class MixMatchConfig(AlgorithmConfig):
    name: str = "mixmatch"
    uratio: int = 1  # MixMatch paper / DASO default (unlabeled batch = labeled batch, per view)
    temperature: float = 0.5  # T (MixMatch paper; DASO mixmatch.yaml)
    mixup_alpha: float = 0.75  # alpha (MixMatch paper, CIFAR; DASO mixmatch.yaml uses 0.5)
    lambda_u: float = 75.0  # (MixMatch paper, CIFAR-10; DASO mixmatch.yaml uses 100)
    rampup_ratio: float = 0.016  # 16k of 1M steps (paper) = DASO CONS_RAMPUP_ITERS_RATIO


@register("mixmatch")
class MixMatch(Algorithm):
    """Sharpened average guess over K=2 weak views, MixUp, soft CE + L2 consistency."""

    Config = MixMatchConfig
    unlabeled_views = ("weak", "weak")

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.feed_refiner(batch, state)
        with torch.no_grad():  # the guess needs no gradient (official DASO: no alignment loss)
            (logits_1, feats_1), (logits_2, _) = forward_all(state.model, *batch.x_ulb)
            # q_bar = 1/K sum_k p_model(y | u_k)  (MixMatch Eq. 6)
            avg = (torch.softmax(logits_1.detach().float(), -1)
                   + torch.softmax(logits_2.detach().float(), -1)) / 2
            linear = avg.argmax(dim=-1)
            targets_u = sharpen(avg, cfg.temperature)  # (Eq. 7)
            # DASO: semantic label of view 1's features, blended into the sharpened average
            targets_u = self.refiner.refine(targets_u, feats_1, state.step)
            pseudo = targets_u.argmax(dim=-1)
        self.refiner.observe(pseudo)

        n_lb = batch.x_lb.size(0)
        x_all = torch.cat([batch.x_lb, *batch.x_ulb])
        y_all = torch.cat([one_hot(batch.y_lb, self.num_classes), targets_u, targets_u])
        x_mix, y_mix, lam = mixup(x_all, y_all, cfg.mixup_alpha)  # (Eqs. 8-11)
        logits = state.model(x_mix).logits.float()

        loss_x = soft_cross_entropy(logits[:n_lb], y_mix[:n_lb]).mean()  # L_X (Eq. 3)
        # L_U = 1/(L |U'|) sum ||q - p_model(y|u)||^2 (Eq. 4): mean over images and classes
        loss_u = F.mse_loss(torch.softmax(logits[n_lb:], -1), y_mix[n_lb:])
        ramp = linear_rampup(state.step, state.total_steps, cfg.rampup_ratio)
        loss = loss_x + cfg.lambda_u * ramp * loss_u  # (Eq. 5) with ramped lambda_U
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mixup/lambda": lam, "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": torch.ones_like(avg[:, 0])}
        # no refiner.extra_loss: the official DASO MixMatch has no semantic alignment loss
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
