"""SimPro (Du, Han and Huang, ICML 2024, "SimPro: A Simple Probabilistic Framework Towards
Realistic Long-Tailed Semi-Supervised Learning"), following the official ``SimPro/train.py``
and ``sh/SimPro.sh`` of github.com/LeapLabTHU/SimPro.

An EM view of semi-supervised learning that decouples the conditional ``p(x | y)`` (the
network's logits ``f(x)``, trained to be class-balanced) from the marginals (the class
priors): ``pi_u``, the unknown prior of the unlabeled data, and ``pi``, the prior of the
whole training set (labeled and unlabeled), both estimated in closed form.

* E-step (pseudo-labels, Bayes-optimal for the estimated unlabeled prior): the soft target
  ``q = softmax(f(u_w) + adj(pi_u, tau))``, ``adj(p, t) = log(p ** t + 1e-12)`` (official
  ``compute_adjustment_by_py``), kept where ``max q >= threshold``.
* M-step, network: the labeled images (weak and strong view) and the strong views of the
  unlabeled ones are trained on the adjusted logits ``f(x) + adj(pi, tau)``:
  ``L = CE(f(x) + adj(pi, tau), y) / r + mean(1(max q >= t) CE(f(u_s) + adj(pi, tau), q))``
  over both strong views, ``r = |U batches| / |L batches|`` of an epoch (official
  ``Lx / args.scale_ratio``, ``scale_ratio = u_len / l_len``: the labeled and unlabeled terms
  weigh as the two sets' sizes do in the likelihood).
* M-step, marginals (closed form, once per epoch of ``epoch_iters`` steps): with ``S`` the sum
  of the epoch's kept soft targets and ``C`` its labeled class counts,
  ``pi_u <- m pi_u + (1 - m) S / (sum S + 1)`` and
  ``pi <- m pi + (1 - m) (C + S) / sum(C + S)`` (official end of epoch; ``m`` = ``--ema-u``).
  ``pi_u`` starts uniform, ``pi`` at the labeled prior (official ``py_uni``, ``py_con``).

Evaluation takes the argmax of the EMA network's raw logits (official ``test``), the
class-balanced prediction.

State: ``pi_u``, ``pi`` and the epoch's sums ``S`` and ``C`` are buffers, so a checkpoint
resumes exactly; under ``torchrun`` the sums are all-reduced, so every rank keeps the same
priors (the official code trains on one GPU).

Differs from the official code: the epoch's update happens at the first step of the next
epoch (same values); ``r`` is computed from the labeled and unlabeled set sizes and the
global batch sizes (``(N_u // (mu B)) / (N_l // B)``, each at least 1); without a call of
``observe_unlabeled_size`` (a bare construction) ``r`` is 1. The official ``--est-epoch`` and
``--T`` are parsed but unused there, and are not settings here.

Logit adjustment (``algorithm.logit_adjust``) is refused: SimPro adjusts its own logits.

With ``pseudo=daso`` the adjusted soft target is refined (DASO's blend) before its confidence
and the sums, the final labels are observed and the alignment loss uses strong view 1.

Diagnostics: ``pseudo/linear`` is the argmax of the raw (balanced) weak-view logits,
``pseudo/final`` the argmax of the target and ``pseudo/mask`` its mask; per class
(``per_class.csv``, kind ``simpro``) the two estimated priors after each evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    StepState,
    refuse_logit_adjust,
    reject_setting,
)
from imbssl.collectives import all_reduce_sum, world_size
from imbssl.pseudo.base import add_extra_loss, hard_labels


@dataclass
class SimProConfig(AlgorithmConfig):
    name: str = "simpro"
    uratio: int = 8  # mu (official sh/SimPro.sh mu=8, CIFAR-10 and CIFAR-100)
    threshold: float = 0.95  # confidence threshold (sh/SimPro.sh CIFAR-10 0.95; CIFAR-100 0.2)
    prior_tau: float = 2.0  # exponent of the priors (sh/SimPro.sh tau: CIFAR-10 2.0, CIFAR-100 1.0)
    prior_momentum: float = 0.9  # m of the priors' moving average (sh/SimPro.sh ema_u=0.9)
    epoch_iters: int = 500  # steps per epoch, the prior update period (train.py --eval-step 500)


def prior_adjustment(prior: Tensor, tau: float) -> Tensor:
    """``log(prior ** tau + 1e-12)`` (official ``compute_adjustment_by_py``)."""
    return torch.log(prior ** tau + 1e-12)


def bayes_pseudo_labels(logits_w: Tensor, unlabeled_prior: Tensor, tau: float) -> Tensor:
    """E-step: ``softmax(f(u_w) + adj(pi_u, tau))``, the posterior under the estimated
    unlabeled prior (official ``pseudo_label``)."""
    return torch.softmax(logits_w.detach().float() + prior_adjustment(unlabeled_prior, tau), dim=-1)


def simpro_losses(logits_lb: Tensor, y_lb: Tensor, logits_s: Tensor, targets: Tensor,
                  mask: Tensor, train_prior: Tensor, tau: float, scale_ratio: float
                  ) -> tuple[Tensor, Tensor]:
    """(L_x, L_u) of the official step: ``CE(f(x) + adj(pi), y) / r`` over the labeled views
    and ``mean(mask CE(f(u_s) + adj(pi), q))`` over the strong views (rows of ``logits_lb``
    / ``logits_s`` are the views stacked, ``y_lb`` / ``targets`` and ``mask`` repeated)."""
    adj = prior_adjustment(train_prior, tau)
    loss_x = F.cross_entropy(logits_lb.float() + adj, y_lb) / scale_ratio
    ce = F.cross_entropy(logits_s.float() + adj, targets, reduction="none")
    return loss_x, (ce * mask).mean()


def updated_priors(unlabeled_prior: Tensor, train_prior: Tensor, pseudo_sum: Tensor,
                   labeled_count: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
    """M-step of the marginals at an epoch's end (official ``estimated_dis`` and
    ``adapt_dis``): ``pi_u <- m pi_u + (1 - m) S / (sum S + 1)``,
    ``pi <- m pi + (1 - m) (C + S) / sum(C + S)`` (``pi`` kept when ``C + S`` is all zero)."""
    new_u = momentum * unlabeled_prior + (1 - momentum) * pseudo_sum / (pseudo_sum.sum() + 1)
    forward = labeled_count + pseudo_sum
    total = forward.sum()
    new_pi = momentum * train_prior + (1 - momentum) * forward / total.clamp_min(1e-12)
    return new_u, torch.where(total > 0, new_pi, train_prior)


def batch_scale_ratio(num_labeled: int, num_unlabeled: int, labeled_batch: int,
                      unlabeled_batch: int) -> float:
    """``r = u_len / l_len``: unlabeled over labeled batches of an epoch (official
    ``scale_ratio``, ``drop_last`` loaders); 1.0 without the unlabeled set size."""
    if num_unlabeled <= 0:
        return 1.0
    u_len = max(num_unlabeled // max(unlabeled_batch, 1), 1)
    l_len = max(num_labeled // max(labeled_batch, 1), 1)
    return u_len / l_len


@register("simpro")
class SimPro(Algorithm):
    """Bayes-optimal soft pseudo-labels from EM estimates of the unlabeled class prior."""

    Config = SimProConfig
    unlabeled_views = ("weak", "strong", "strong")  # official TransformFixMatch: weak, 2 strong
    labeled_views = ("strong",)  # official TransformFixMatch2: the labeled weak and strong views

    def __init__(self, cfg: SimProConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        refuse_logit_adjust(cfg, "simpro", "adjusts its logits itself (estimated priors)")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "prior_tau", ">= 0", when=cfg.prior_tau < 0)
        reject_setting(cfg, "prior_momentum", "in [0, 1)", when=not 0 <= cfg.prior_momentum < 1)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        reject_setting(cfg, "threshold", "in [0, 1]", when=not 0 <= cfg.threshold <= 1)
        self.num_unlabeled = 0
        #: pi_u, the estimated unlabeled class prior (official estimated_dis, uniform at first)
        self.register_buffer("unlabeled_prior", torch.full((num_classes,), 1.0 / num_classes))
        #: pi, the training set's class prior (official adapt_dis, the labeled prior at first)
        self.register_buffer("train_prior", self.labeled_prior.clone())
        #: S, this epoch's sum of kept soft targets (official dis_unlabeled)
        self.register_buffer("epoch_pseudo_sum", torch.zeros(num_classes))
        #: C, this epoch's labeled class counts (official count_labeled_dataset)
        self.register_buffer("epoch_labeled_count", torch.zeros(num_classes))

    def observe_unlabeled_size(self, num_unlabeled: int) -> None:
        self.num_unlabeled = int(num_unlabeled)

    @torch.no_grad()
    def start_epoch(self, step: int) -> None:
        """At the first step of every epoch but the first: the M-step of the priors from the
        previous epoch's sums, which then restart."""
        if step == 0 or step % self.cfg.epoch_iters != 0:
            return
        new_u, new_pi = updated_priors(self.unlabeled_prior, self.train_prior,
                                       self.epoch_pseudo_sum, self.epoch_labeled_count,
                                       self.cfg.prior_momentum)
        self.unlabeled_prior.copy_(new_u)
        self.train_prior.copy_(new_pi)
        self.epoch_pseudo_sum.zero_()
        self.epoch_labeled_count.zero_()

    @torch.no_grad()
    def accumulate(self, probs: Tensor, mask: Tensor, y_lb: Tensor) -> None:
        """Add the batch's kept soft targets and labeled class counts to the epoch's sums
        (every process's batch: all-reduced)."""
        counts = torch.bincount(y_lb, minlength=self.num_classes).float()
        kept = (probs * mask.unsqueeze(-1)).sum(dim=0)
        sums = all_reduce_sum(torch.stack([kept, counts]))
        self.epoch_pseudo_sum.add_(sums[0])
        self.epoch_labeled_count.add_(sums[1])

    def scale_ratio(self, batch: Batch) -> float:
        """``r`` for this run's set sizes and global batch sizes."""
        world = world_size()
        return batch_scale_ratio(self.num_labeled, self.num_unlabeled,
                                 len(batch.x_lb) * world, len(batch.x_ulb[0]) * world)

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        parts = super().per_class_diagnostics()
        parts["simpro"] = {"unlabeled_prior": self.unlabeled_prior.clone(),
                           "train_prior": self.train_prior.clone()}
        return parts

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.start_epoch(state.step)
        self.feed_refiner(batch, state)
        (x_s_lb,) = batch.x_lb_views
        x_w, x_s1, x_s2 = batch.x_ulb
        out = state.model(torch.cat([batch.x_lb, x_s_lb, x_w, x_s1, x_s2]))
        sizes = [len(batch.x_lb), len(x_s_lb), len(x_w), len(x_s1), len(x_s2)]
        logits = out.logits.float().split(sizes)
        feats_w, feats_s1 = out.features.split(sizes)[2:4]

        with torch.no_grad():
            linear = logits[2].argmax(dim=-1)
            probs = bayes_pseudo_labels(logits[2], self.unlabeled_prior, cfg.prior_tau)
            probs = self.refiner.refine(probs, feats_w.detach(), state.step)
            conf, pseudo = hard_labels(probs)
            mask = conf.ge(cfg.threshold).float()
            self.accumulate(probs, mask, batch.y_lb)
        self.refiner.observe(pseudo)

        loss_x, loss_u = simpro_losses(
            torch.cat(logits[:2]), batch.y_lb.repeat(2), torch.cat(logits[3:]),
            probs.repeat(2, 1), mask.repeat(2), self.train_prior, cfg.prior_tau,
            self.scale_ratio(batch))
        loss = loss_x + loss_u  # official: Lx + Lu
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": mask}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s1, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
