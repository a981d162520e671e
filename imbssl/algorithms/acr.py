"""ACR: Adaptive Consistency Regularizer (Wei and Gan, CVPR 2023, "Towards Realistic
Long-Tailed Semi-Supervised Learning: Consistency Is All You Need"), following the official
``train.py`` (github.com/Gank0078/ACR).

Two linear classifiers on the shared features: the standard one (the network's classifier)
and a balanced one (the head ``balanced``), which evaluation uses (official ``test``
reports ``test_acc_b``, the balanced branch). ``adj(pi, t) = log(pi ** t + 1e-12)`` with
``pi`` the labeled class frequencies (official ``compute_adjustment_by_py``):

* labeled: ``CE(f(x), y)`` for the standard head and the logit-adjusted
  ``CE(g(x) + adj(pi, tau2), y)`` for the balanced one;
* unlabeled, standard head: target ``argmax softmax((f(u_w) - adj(pi, tau)) / T)`` with the
  *adaptive* ``tau``; mask ``max p_adjusted >= t or max softmax(f(u_w) / T) >= t``; CE on
  both strong views;
* unlabeled, balanced head: target ``argmax softmax((f(u_w) - adj(pi, tau12)) / T)``; mask
  ``max softmax(g(u_w) / T) >= t or max of that target >= t``; CE on both strong views;
* the total is the plain sum of the four losses.

Adaptive ``tau`` (the adaptive logit adjustment): after ``estimate_after_epochs`` epochs of
``epoch_iters`` steps, each step moves the estimate of the unlabeled class distribution
``u <- m u + (1 - m) c / sum(c)``, with ``c`` the per-class count of the balanced head's
confident predictions on the weak view, and adds the symmetric KL divergences of ``u`` to
three anchors (the labeled distribution ``pi``, uniform, ``pi`` reversed) to a sum. At the
start of every later epoch ``tau = tau_min + (tau_max - tau_min) softmax(mean KL)[0]`` (the
mean over the previous epoch's steps); the sum restarts. ``tau`` keeps its value when the
result is not finite (official ``math.isnan`` check). Before the first update ``tau = tau_max``
(official ``adjustment_l1`` from ``tau1``); the first update follows the epoch right after
``estimate_after_epochs``, which accumulates nothing, so it gives ``tau_max / 3`` (as
official).

As the official code, ``c`` is one mark per class and batch, not a count: the official
``now_mask[targets_u_b] += mask_l * mask_b`` adds through a fancy index, which does not
accumulate repeated indices, so class k gets the confidence (0/1) of *one* image predicted as
k (the last one in the batch, as PyTorch writes repeated indices on the CPU; on the GPU the
official write order is unspecified). ``class_marks`` computes exactly that, deterministically
on every device. The paper (Sec. 3.3) describes the estimate as the distribution of the
confident predictions; the official marks are what its numbers come from. All estimator
state (``u``, the KL sum, ``tau``) lives in buffers, so a checkpoint resumes exactly.

Logit adjustment (``algorithm.logit_adjust``) is refused: ACR adjusts its own logits.

With ``pseudo=daso`` the standard head's adjusted target is refined (blended) before its
confidence and label, the final labels are observed and the alignment loss uses strong view 1.

Diagnostics: ``pseudo/linear`` is the standard head's unadjusted argmax, ``pseudo/final`` the
adjusted (refined) target and ``pseudo/mask`` its mask, so the per-class tables show what the
adaptive adjustment changed, class by class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.abc import linear_head
from imbssl.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    StepState,
    refuse_logit_adjust,
    reject_setting,
)
from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import add_extra_loss, hard_labels

BALANCED_HEAD = "balanced"
TAU_MIN = 0.0  # official train.py: args.taumin = 0


@dataclass
class ACRConfig(AlgorithmConfig):
    name: str = "acr"
    uratio: int = 1  # mu (official train.py --mu default; its README commands keep it)
    threshold: float = 0.95  # confidence threshold (official --threshold)
    temperature: float = 1.0  # T of the pseudo-label softmax (official --T)
    tau_max: float = 2.0  # largest adaptive tau, standard head's consistency (official --tau1)
    tau_balanced_target: float = 2.0  # tau of the balanced head's target (official --tau12)
    tau_balanced_labeled: float = 2.0  # tau of the balanced head's labeled loss (official --tau2)
    estimate_momentum: float = 0.99  # EMA of the unlabeled estimate (README --ema-u 0.99)
    epoch_iters: int = 500  # steps per epoch (official --eval-step)
    estimate_after_epochs: int = 5  # estimation starts after this epoch (official --est-epoch)


def logit_adjustment(prior: Tensor, tau: Tensor | float) -> Tensor:
    """``log(prior ** tau + 1e-12)`` (official ``compute_adjustment_by_py``)."""
    return torch.log(prior ** tau + 1e-12)


def symmetric_kl(p: Tensor, q: Tensor) -> Tensor:
    """``0.5 KL(q || p) + 0.5 KL(p || q)`` of two distributions (official
    ``0.5 * KL_div(p.log(), q) + 0.5 * KL_div(q.log(), p)``, ``reduction='sum'``)."""
    return 0.5 * F.kl_div(p.log(), q, reduction="sum") + 0.5 * F.kl_div(q.log(), p, reduction="sum")


def anchor_divergences(estimate: Tensor, prior: Tensor) -> Tensor:
    """(3,) symmetric KL of ``estimate`` to the labeled prior, uniform and the reversed prior
    (official ``KL_con, KL_uni, KL_rev``; ``py_rev = torch.flip(py_con)``)."""
    uniform = torch.full_like(prior, 1.0 / prior.numel())
    return torch.stack([symmetric_kl(a, estimate) for a in (prior, uniform, prior.flip(0))])


def adaptive_tau(mean_kl: Tensor, tau_min: float, tau_max: float) -> Tensor:
    """``tau_min + (tau_max - tau_min) * exp(d_con) / sum_j exp(d_j)`` (official
    ``KL_softmax``)."""
    return tau_min + (tau_max - tau_min) * torch.softmax(mean_kl, dim=0)[0]


def class_marks(predictions: Tensor, confident: Tensor, num_classes: int) -> Tensor:
    """(K,) official ``now_mask[predictions] += confident``: for every predicted class, the
    confidence mark (0/1) of the *last* image of the batch predicted as it (the indexed add
    does not accumulate repeated indices); 0 for classes nobody predicts."""
    positions = torch.arange(len(predictions), device=predictions.device)
    last = torch.full((num_classes,), -1, dtype=torch.long, device=predictions.device)
    last.scatter_reduce_(0, predictions, positions, reduce="amax")
    marks = confident.float()[last.clamp_min(0)] if len(predictions) else last.float()
    return torch.where(last >= 0, marks, torch.zeros_like(marks))


@register("acr")
class ACR(Algorithm):
    """Dual-branch FixMatch with adaptive logit adjustment from the estimated unlabeled prior."""

    Config = ACRConfig
    unlabeled_views = ("weak", "strong", "strong")

    def __init__(self, cfg: ACRConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        refuse_logit_adjust(cfg, "acr", "adjusts its logits itself (adaptive tau)")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        for key in ("tau_max", "tau_balanced_target", "tau_balanced_labeled",
                    "estimate_after_epochs"):
            reject_setting(cfg, key, ">= 0", when=getattr(cfg, key) < 0)
        reject_setting(cfg, "estimate_momentum", "in [0, 1)",
                       when=not 0 <= cfg.estimate_momentum < 1)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        #: estimate of the unlabeled class distribution (official args.u_py, uniform at first)
        self.register_buffer("u_py", torch.full((num_classes,), 1.0 / num_classes))
        #: sum over this epoch's steps of the (con, uni, rev) divergences (official count_KL)
        self.register_buffer("kl_sum", torch.zeros(3))
        #: adaptive tau of the standard head's consistency target (official tau1 at first)
        self.register_buffer("tau", torch.tensor(float(cfg.tau_max)))

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {BALANCED_HEAD: linear_head(feat_dim, num_classes)}

    def eval_predictor(self, model: nn.Module):
        head = model.heads[BALANCED_HEAD]
        return lambda output: head(output.features)

    def estimating(self, step: int) -> bool:
        """Whether ``step`` is in an epoch after ``estimate_after_epochs`` (official
        ``epoch > args.est_epoch``, epochs counted from 0)."""
        return step // self.cfg.epoch_iters > self.cfg.estimate_after_epochs

    @torch.no_grad()
    def start_epoch(self, step: int) -> None:
        """At the first step of an estimating epoch: ``tau`` from the previous epoch's mean
        divergences (kept if not finite), then the sum restarts."""
        cfg = self.cfg
        if step % cfg.epoch_iters != 0 or not self.estimating(step):
            return
        tau = adaptive_tau(self.kl_sum / cfg.epoch_iters, TAU_MIN, cfg.tau_max)
        self.tau.copy_(torch.where(torch.isfinite(tau), tau, self.tau))
        self.kl_sum.zero_()

    @torch.no_grad()
    def update_estimate(self, predictions: Tensor, confident: Tensor) -> None:
        """Move ``u_py`` towards the normalised per-class marks of the balanced head's
        predictions (``class_marks``, official ``now_mask``) and add the anchor divergences of
        the new estimate; nothing when no mark is set.
        Under ``torch.distributed`` every rank's batch counts (a collective), so every rank
        keeps the same estimate and ``tau``."""
        predictions, confident = all_gather_cat(predictions), all_gather_cat(confident)
        counts = class_marks(predictions, confident, self.num_classes)
        total = counts.sum()
        m = self.cfg.estimate_momentum
        new = m * self.u_py + (1 - m) * counts / total.clamp_min(1.0)
        any_confident = total > 0
        self.u_py.copy_(torch.where(any_confident, new, self.u_py))
        kl = anchor_divergences(self.u_py, self.labeled_prior)
        self.kl_sum.add_(torch.where(any_confident, kl, torch.zeros_like(kl)))

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, model = self.cfg, state.model
        self.start_epoch(state.step)
        self.feed_refiner(batch, state)
        x_w, x_s1, x_s2 = batch.x_ulb
        out = model(torch.cat([batch.x_lb, x_w, x_s1, x_s2]))
        sizes = [len(batch.x_lb), len(x_w), len(x_s1), len(x_s2)]
        logits_x, logits_w, logits_s1, logits_s2 = out.logits.float().split(sizes)
        bal_x, bal_w, bal_s1, bal_s2 = model.heads[BALANCED_HEAD](out.features).float().split(sizes)
        feats_w, feats_s1 = out.features.split(sizes)[1:3]
        prior = self.labeled_prior

        loss_x = F.cross_entropy(logits_x, batch.y_lb)
        loss_xb = F.cross_entropy(bal_x + logit_adjustment(prior, cfg.tau_balanced_labeled),
                                  batch.y_lb)  # logit-adjusted loss of the balanced head
        with torch.no_grad():
            weak, t, thr = logits_w.detach(), cfg.temperature, cfg.threshold
            conf_raw, linear = hard_labels(torch.softmax(weak / t, dim=-1))
            probs = torch.softmax((weak - logit_adjustment(prior, self.tau)) / t, dim=-1)
            probs = self.refiner.refine(probs, feats_w.detach(), state.step)
            conf, pseudo = hard_labels(probs)
            conf_h2, pseudo_h2 = hard_labels(torch.softmax(
                (weak - logit_adjustment(prior, cfg.tau_balanced_target)) / t, dim=-1))
            conf_b, pred_b = hard_labels(torch.softmax(bal_w.detach() / t, dim=-1))
            mask = (conf.ge(thr) | conf_raw.ge(thr)).float()  # official mask_ss_t
            mask_b = (conf_b.ge(thr) | conf_h2.ge(thr)).float()  # official mask_ss_b_h2
            if self.estimating(state.step):
                self.update_estimate(pred_b, conf_b.ge(thr))
        self.refiner.observe(pseudo)

        loss_u = _two_view_ce(logits_s1, logits_s2, pseudo, mask)
        loss_ub = _two_view_ce(bal_s1, bal_s2, pseudo_h2, mask_b)
        loss = loss_x + loss_u + loss_xb + loss_ub  # official: Lx + Lu + Lx_b + Lu_b
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "loss/balanced_labeled": loss_xb.detach(),
                "loss/balanced_unlabeled": loss_ub.detach(), "mask/ratio": mask.mean(),
                "mask/balanced_ratio": mask_b.mean(), "acr/tau": self.tau.clone(),
                "pseudo/linear": linear, "pseudo/final": pseudo, "pseudo/mask": mask}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s1, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs


def _two_view_ce(logits_s1: Tensor, logits_s2: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over both strong views of the masked CE (official ``cat`` of the two views)."""
    ce = torch.cat([F.cross_entropy(logits_s1, targets, reduction="none"),
                    F.cross_entropy(logits_s2, targets, reduction="none")])
    return (ce * torch.cat([mask, mask])).mean()
