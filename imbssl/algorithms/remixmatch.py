"""ReMixMatch (Berthelot et al., ICLR 2020), following DASO's ``remixmatch.py``/``rm_daso.py``.

Guess on the weak view: softmax -> distribution alignment (p(y) of the labeled set over the
running mean of the last 128 batches' predictions) -> sharpen (T=0.5) -> refiner (DASO blend).
The guess anchors both strong views (augmentation anchoring). Losses: soft CE on the mixed
labeled part, soft CE on the mixed unlabeled part (lambda_U, ramped), pre-MixUp soft CE of
strong view 1 against the guess (lambda_U1, ramped), rotation CE on strong view 1 (lambda_r).
Forward passes: [weak, strong 1] (guess, pre-MixUp logits, refiner features), one concatenated
pass over the mixed [labeled, weak, strong 1, strong 2] (batch norm sees all of it, so DASO's
interleaving is unnecessary), and the rotated strong view 1.

DASO placement, checked against the official ``lib/algorithm/rm_daso.py`` (ReMixMatchDASO):
labeled EMA features are queued first; one encoder pass over [weak, strong 1] gives the
features; the semantic pseudo-label comes from the weak features (no gradient); the classifier
guess is softmax -> DA -> sharpen, and the blend weight is looked up at the argmax of the
*sharpened* guess and mixes the semantic label into it; the blended targets feed the pre-MixUp
loss, all three MixUp targets and the m_hat histogram. The alignment loss (weight
``PSA_LOSS_WEIGHT``, not ramped) is H(q_weak, q_strong1) over the semantic similarities of
strong view 1, the view the pre-MixUp loss uses. Note: the official ReMixMatch+DASO config
(``configs/*/remixmatch_daso.yaml``) sets ``MODEL.DIST_ALIGN.APPLY: False``; for that
setting pass ``algorithm.dist_align=none`` with ``pseudo=daso`` (the default here keeps the
ReMixMatch paper's distribution alignment on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.algorithms.ops import (
    linear_rampup,
    mixup,
    one_hot,
    rotate_batch,
    sharpen,
    soft_cross_entropy,
)
from imbssl.data.ctaugment import build_ctaugment, with_ctaugment
from imbssl.errors import UserError
from imbssl.pseudo.base import IdentityRefiner, add_extra_loss
from imbssl.pseudo.dist_align import build_dist_align


@dataclass
class ReMixMatchConfig(AlgorithmConfig):
    name: str = "remixmatch"
    uratio: int = 1  # ReMixMatch paper / DASO default (UNLABELED_BATCH_RATIO 1)
    temperature: float = 0.5  # T (paper; DASO remixmatch.yaml)
    mixup_alpha: float = 0.75  # alpha (paper; DASO remixmatch.yaml)
    lambda_u: float = 1.5  # lambda_U, mixed unlabeled CE (paper; DASO UNLABELED_LOSS_WEIGHT)
    lambda_kl: float = 0.5  # lambda_U1, pre-MixUp loss (paper; DASO WEIGHT_KL)
    lambda_rot: float = 0.5  # lambda_r, rotation loss (paper; DASO WEIGHT_ROT)
    rampup_ratio: float = 0.016  # linear ramp of lambda_U, lambda_U1 (DASO CONS_RAMPUP_ITERS_RATIO)
    dist_align: str = "labeled"  # labeled | uniform | none (paper: labeled p(y))
    dist_align_window: int = 128  # batches in p~(y) (paper; DASO Queue max_size)
    strong_augment: str = "randaugment"  # randaugment (DASO) | ctaugment (ReMixMatch paper)
    # official: separate without a refiner (DASO remixmatch.py), joint with one (rm_daso.py)
    passes: str = "official"  # official | separate | joint


PASSES = ("official", "separate", "joint")


def rotation_head(feat_dim: int) -> nn.Linear:
    """Linear(feat_dim, 4), Xavier-normal weights and zero bias (DASO's RotationHead)."""
    head = nn.Linear(feat_dim, 4)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@register("remixmatch")
class ReMixMatch(Algorithm):
    """Distribution alignment, augmentation anchoring, MixUp and rotation self-supervision."""

    Config = ReMixMatchConfig
    # official build.py: ReMixMatch's RandAugment + Cutout after the resize (ra_first=False)
    unlabeled_views = ("weak", "strong_after_resize", "strong_after_resize")

    def __init__(self, cfg: ReMixMatchConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        self.dist_align = build_dist_align(cfg.dist_align, num_classes, self.labeled_prior,
                                           cfg.dist_align_window)
        self.ctaugment = build_ctaugment(cfg.strong_augment)  # its weights: a buffer
        self.unlabeled_views = with_ctaugment(type(self).unlabeled_views, self.ctaugment)
        self.joint_pass = joint_pass(cfg.passes, type(self.refiner) is not IdentityRefiner)

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {"rotation": rotation_head(feat_dim)}

    def consistency_ramp(self, state: StepState) -> float:
        """Weight ramp of lambda_U and lambda_U1 (linear over ``rampup_ratio`` of training)."""
        return linear_rampup(state.step, state.total_steps, self.cfg.rampup_ratio)

    def guess_probs(self, logits_w: Tensor, state: StepState) -> tuple[Tensor, Tensor]:
        """(q, the diagnostics' linear pseudo-label): the weak view's class probabilities the
        guess starts from, before alignment and sharpening, ``q = softmax(f(alpha(u)))``, and
        their argmax. Call under ``torch.no_grad()``; a variant changes ``q`` here (CDMAD:
        ``softmax(f(alpha(u)) - g)``)."""
        probs = torch.softmax(logits_w.detach().float(), dim=-1)
        return probs, probs.argmax(dim=-1)

    @torch.no_grad()
    def guess_targets(self, logits_w: Tensor, feats_w: Tensor, state: StepState
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """(guessed targets q of the unlabeled batch, linear pseudo-label, argmax q): the weak
        view's probabilities (``guess_probs``) -> distribution alignment -> sharpening ->
        the refiner."""
        probs, linear = self.guess_probs(logits_w, state)
        if self.dist_align is not None:  # q = Normalize(q * p(y) / p~(y))  (Sec. 3.1)
            probs = self.dist_align(probs)
        targets_u = sharpen(probs, self.cfg.temperature)  # (Alg. 1, as MixMatch Eq. 7)
        targets_u = self.refiner.refine(targets_u, feats_w.detach(), state.step)
        return targets_u, linear, targets_u.argmax(dim=-1)

    def mixup_labeled_images(self, batch: Batch) -> Tensor:
        """The labeled images that enter MixUp: the weak view ``batch.x_lb`` (ReMixMatch
        Alg. 1; CDMAD's official code mixes a strong view)."""
        return batch.x_lb

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, model = self.cfg, state.model
        x_w, x_s1, x_s2 = batch.x_ulb
        self.feed_refiner(batch, state)
        probe_logs = self.probe_ctaugment(batch, state)
        if self.joint_pass:  # rm_daso.py: one pass over [weak, strong 1]
            (logits_w, feats_w), (logits_s1, feats_s1) = forward_all(model, x_w, x_s1)
        else:  # remixmatch.py: the guess from a no-grad pass over the weak view alone
            with torch.no_grad():
                out_w = model(x_w)
            logits_w, feats_w = out_w.logits, out_w.features

        targets_u, linear, pseudo = self.guess_targets(logits_w, feats_w, state)
        self.refiner.observe(pseudo)
        ramp = self.consistency_ramp(state)

        n_lb = batch.x_lb.size(0)
        x_all = torch.cat([self.mixup_labeled_images(batch), x_w, x_s1, x_s2])
        y_all = torch.cat([one_hot(batch.y_lb, self.num_classes), targets_u, targets_u, targets_u])
        x_mix, y_mix, lam = mixup(x_all, y_all, cfg.mixup_alpha)
        logits = model(x_mix).logits
        loss_x = soft_cross_entropy(self.labeled_logits(logits[:n_lb]), y_mix[:n_lb]).mean()
        loss_u = soft_cross_entropy(logits[n_lb:], y_mix[n_lb:]).mean()

        if not self.joint_pass:  # remixmatch.py: strong view 1 alone, after the MixUp pass
            out_s1 = model(x_s1)
            logits_s1, feats_s1 = out_s1.logits, out_s1.features
        # pre-MixUp loss: H(q, p_model(y | u^_1)) on strong view 1  (Sec. 3.3, lambda_U1)
        loss_kl = soft_cross_entropy(logits_s1, targets_u).mean()

        # rotation self-supervision on strong view 1: r ~ U{0, 90, 180, 270}  (Sec. 3.3)
        rot = torch.randint(0, 4, (x_s1.size(0),), device=x_s1.device)
        rot_logits = model.heads["rotation"](model(rotate_batch(x_s1, rot)).features)
        loss_rot = F.cross_entropy(rot_logits.float(), rot)

        # total loss (Sec. 3.3): L_X + lambda_U L_U + lambda_U1 L_U1 + lambda_r L_rot
        loss = (loss_x + ramp * (cfg.lambda_u * loss_u + cfg.lambda_kl * loss_kl)
                + cfg.lambda_rot * loss_rot)
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "loss/premixup": loss_kl.detach(), "loss/rotation": loss_rot.detach(),
                "mixup/lambda": lam, "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": torch.ones(pseudo.shape, dtype=torch.float32, device=pseudo.device),
                **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s1, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs


def joint_pass(passes: str, has_refiner: bool) -> bool:
    """Whether weak and strong view 1 share one forward pass (``algorithm.passes``)."""
    if passes not in PASSES:
        raise UserError(f"algorithm.passes must be one of {PASSES}, got {passes!r}")
    return passes == "joint" or (passes == "official" and has_refiner)
