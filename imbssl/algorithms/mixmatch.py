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

Ablation switches (MixMatch paper Table 4; official ``ablation/ab_mixmatch.py`` and
``runs/table4.sh`` of github.com/google-research/mixmatch): ``num_views`` (K, flag ``--nu``),
``temperature`` (T = 1: no sharpening), ``mixup_mode`` (official ``MixMode``: ``all`` =
"xxy.yxy", ``none`` = ".", ``labeled`` = "xx.", ``unlabeled`` = ".yy", ``separate`` = "xx.yy")
and ``guess_with_ema`` (``--use_ema_guess``: the guess pass runs the EMA parameters with
batch-norm in training mode, as the official ``classifier(y, training=True, getter=ema)``).
With DASO and any K, the semantic pseudo-label still comes from the first view's features.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.algorithms.ops import linear_rampup, mixup, one_hot, sharpen, soft_cross_entropy
from imbssl.errors import UserError

MIXUP_MODES = ("all", "none", "labeled", "unlabeled", "separate")


@dataclass
class MixMatchConfig(AlgorithmConfig):
    name: str = "mixmatch"
    uratio: int = 1  # MixMatch paper / DASO default (unlabeled batch = labeled batch, per view)
    temperature: float = 0.5  # T (MixMatch paper; DASO mixmatch.yaml)
    mixup_alpha: float = 0.75  # alpha (MixMatch paper, CIFAR; DASO mixmatch.yaml uses 0.5)
    lambda_u: float = 75.0  # (MixMatch paper, CIFAR-10; DASO mixmatch.yaml uses 100)
    rampup_ratio: float = 0.016  # 16k of 1M steps (paper) = DASO CONS_RAMPUP_ITERS_RATIO
    num_views: int = 2  # K weak views averaged in the guess (paper Sec. 3.2; Table 4: 1..4)
    mixup_mode: str = "all"  # all | none | labeled | unlabeled | separate (paper Table 4)
    guess_with_ema: bool = False  # guess with the EMA parameters (Table 4 "parameter EMA")


def mix_batches(x_lb: Tensor, y_lb: Tensor, x_ulb: Tensor, y_ulb: Tensor, mode: str,
                alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """MixUp of [labeled; unlabeled] rows under ``mode`` (official ``MixMode``); returns the
    mixed (x, y) in the same row order and lambda' (1 where nothing is mixed; ``separate``:
    the labeled part's)."""
    one = torch.ones((), device=x_lb.device)
    if mode == "all":  # every row with any row (Eqs. 8-11)
        return mixup(torch.cat([x_lb, x_ulb]), torch.cat([y_lb, y_ulb]), alpha)
    if mode == "none":
        return torch.cat([x_lb, x_ulb]), torch.cat([y_lb, y_ulb]), one
    mixed_lb = mixup(x_lb, y_lb, alpha) if mode in ("labeled", "separate") else (x_lb, y_lb, one)
    mixed_u = mixup(x_ulb, y_ulb, alpha) if mode in ("unlabeled", "separate") else (
        x_ulb, y_ulb, one)
    lam = mixed_u[2] if mode == "unlabeled" else mixed_lb[2]
    return torch.cat([mixed_lb[0], mixed_u[0]]), torch.cat([mixed_lb[1], mixed_u[1]]), lam


@contextlib.contextmanager
def training_mode(model: nn.Module):
    """Run ``model`` in training mode (batch statistics in batch norm), then restore its mode."""
    was_training = model.training
    model.train()
    try:
        yield model
    finally:
        model.train(was_training)


@register("mixmatch")
class MixMatch(Algorithm):
    """Sharpened average guess over K weak views, MixUp, soft CE + L2 consistency."""

    Config = MixMatchConfig
    unlabeled_views = ("weak", "weak")  # K = 2; an instance with num_views = K has K entries

    def __init__(self, cfg: MixMatchConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        if cfg.num_views < 1:
            raise UserError(f"algorithm.num_views must be >= 1 (K weak views), got {cfg.num_views}")
        if cfg.mixup_mode not in MIXUP_MODES:
            raise UserError(f"algorithm.mixup_mode must be one of {MIXUP_MODES}, "
                            f"got {cfg.mixup_mode!r}")
        if cfg.temperature <= 0:
            raise UserError(f"algorithm.temperature must be > 0 (1: no sharpening), "
                            f"got {cfg.temperature}")
        self.unlabeled_views = ("weak",) * cfg.num_views

    def guess(self, x_ulb: list[Tensor], state: StepState) -> tuple[Tensor, Tensor]:
        """(q_bar = 1/K sum_k p_model(y | u_k) (Eq. 6), features of view 1), no gradient."""
        with torch.no_grad():
            if self.cfg.guess_with_ema:
                with training_mode(state.ema_model) as ema:
                    outs = forward_all(ema, *x_ulb)
            else:
                outs = forward_all(state.model, *x_ulb)
            probs = torch.stack([torch.softmax(logits.detach().float(), -1)
                                 for logits, _ in outs])
            return probs.mean(0), outs[0][1].detach()

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.feed_refiner(batch, state)
        avg, feats_1 = self.guess(batch.x_ulb, state)
        with torch.no_grad():  # the guess needs no gradient (official DASO: no alignment loss)
            linear = avg.argmax(dim=-1)
            targets_u = sharpen(avg, cfg.temperature)  # (Eq. 7)
            # DASO: semantic label of view 1's features, blended into the sharpened average
            targets_u = self.refiner.refine(targets_u, feats_1, state.step)
            pseudo = targets_u.argmax(dim=-1)
        self.refiner.observe(pseudo)

        n_lb, k = batch.x_lb.size(0), len(batch.x_ulb)
        x_mix, y_mix, lam = mix_batches(  # (Eqs. 8-11) under cfg.mixup_mode
            batch.x_lb, one_hot(batch.y_lb, self.num_classes), torch.cat(batch.x_ulb),
            targets_u.repeat(k, 1), cfg.mixup_mode, cfg.mixup_alpha)
        logits = state.model(x_mix).logits.float()

        loss_x = soft_cross_entropy(self.labeled_logits(logits[:n_lb]), y_mix[:n_lb]).mean()  # L_X
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
