"""SAW: Smoothed Adaptive Weighting (Lai et al., ICML 2022, "Smoothed Adaptive Weighting for
Imbalanced Semi-Supervised Learning: Improve Reliability Against Unknown Distribution Data"),
on FixMatch, following the official github.com/ZJUJeffLai/SAW_SSL (``train_fix_cifar10.py``,
``imbOptim/classWeights.py`` and the settings of ``train_example.sh``).

Class weights from the effective number of samples (Cui et al., CVPR 2019),
``w_k = (1 - beta) / (1 - beta ** n_k)``, normalised to sum to ``K`` (official
``getClassWeights``, type ``effective``, ``--normalize 1``), multiply the per-image losses:

* labeled: ``1/B sum_b w^x[y_b] H(y_b, p(x_b))`` with ``n_k`` the labeled class counts
  (official ``--distbl gt_l``), fixed;
* unlabeled: ``1/(mu B) sum_b w^u[q_b] 1(max p >= tau) H(q_b, p(A(u_b)))`` (official
  ``SemiLoss``), with ``n_k`` the counts of the latest weak-view pseudo-label of every
  unlabeled image seen so far (official ``--distbu pseudo``: ``pseudo_orig`` updated at every
  step, its argmax counted), recomputed at the end of every epoch; uniform weights during the
  first epoch (official ``createSettings``: ones).

``beta`` is a fixed value (official ``train_example.sh --effective 0.99``); ``beta = 1`` uses
``(N - 1) / N`` with ``N`` the mean class count (official rule for ``--effective 1``, the only
rule of USB's port). Empty classes count as 1 (official ``torch.where(distb == 0, ones, ...)``).

Differs from the official code: one strong view per image with ``uratio`` images per labeled
one (imbssl's FixMatch; official: as many unlabeled as labeled images, two strong views each);
an image not yet seen is not counted (official: its uniform initial prediction counts as class
0), which only matters before every image has been seen once. The per-image memory and the
weights are buffers, so a checkpoint resumes exactly. USB's port differs: ``beta`` is always
``(N - 1) / N``, the unlabeled counts come from a pass of the EMA model over the unaugmented
unlabeled set, empty classes count as 1 after the pass rather than before.

With ``pseudo=daso`` (or DARP) the counted pseudo-label is the refined one (official: with
``--darp`` the DARP-refined distribution is used) and the weights index the refined labels.

Diagnostics: ``pseudo/linear`` the raw argmax, ``pseudo/final`` the (refined) pseudo-label,
``pseudo/mask`` the confidence mask; ``saw/weight_max`` / ``saw/weight_min`` of the unlabeled
weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Batch, StepState, reject_setting
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig, fixmatch_mask
from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import add_extra_loss


@dataclass
class SAWConfig(FixMatchConfig):
    name: str = "saw"
    uratio: int = 2  # mu (DASO protocol; official: 64 unlabeled images, two strong views each)
    threshold: float = 0.95  # tau (official train_example.sh TAU=0.95)
    lambda_u: float = 1.0  # (official train_example.sh LAMBDA_U=1)
    beta: float = 0.99  # effective-number beta (official train_example.sh --effective 0.99); 1: (N-1)/N
    normalize: float = 1.0  # weights sum to normalize * K (official train_example.sh --normalize 1)
    epoch_iters: int = 500  # steps per epoch, the weight update period (official --val-iteration 500)


def effective_weights(counts: Tensor, beta: float, normalize: float) -> Tensor:
    """``normalize * K * w / sum(w)`` with ``w_k = (1 - b) / (1 - b ** n_k)``; ``b = beta``, or
    ``(N - 1) / N`` (``N`` the mean count) when ``beta == 1``; zero counts count as 1
    (official ``getClassWeights``, type ``effective``)."""
    counts = counts.float()
    if beta == 1:
        mean = counts.sum() / len(counts)
        b = (mean - 1) / mean
    else:
        b = beta
    counts = torch.where(counts == 0, torch.ones_like(counts), counts)
    weights = (1 - b) / (1 - b ** counts)
    return normalize * len(weights) * weights / weights.sum()


def weighted_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor,
                           mask: Tensor | None = None) -> Tensor:
    """``mean_b w[t_b] m_b H(t_b, softmax(logits_b))`` (official ``SemiLoss`` with one-hot
    targets)."""
    loss = F.cross_entropy(logits.float(), targets, reduction="none") * weights[targets]
    return (loss if mask is None else loss * mask).mean()


@register("saw")
class SAW(FixMatch):
    """FixMatch with effective-number class weights on both losses, the unlabeled ones from
    the pseudo-label distribution of the previous epoch."""

    Config = SAWConfig

    def __init__(self, cfg: SAWConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "beta", "in (0, 1]", when=not 0 < cfg.beta <= 1)
        reject_setting(cfg, "normalize", "> 0", when=cfg.normalize <= 0)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        counts = torch.bincount(labeled_labels.long().cpu(), minlength=num_classes)
        self.register_buffer("labeled_weights", effective_weights(counts, cfg.beta,
                                                                  cfg.normalize))
        self.register_buffer("unlabeled_weights", torch.ones(num_classes))
        #: latest pseudo-label of every unlabeled image seen (-1: not seen); grows to N_u
        self.register_buffer("latest_pseudo", torch.zeros(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "latest_pseudo"  # its size is the largest index seen: take the saved one
        if key in state_dict:
            self.latest_pseudo = torch.zeros_like(state_dict[key],
                                                  device=self.latest_pseudo.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def record(self, indices: Tensor, pseudo: Tensor) -> None:
        """Store the batch's pseudo-labels by unlabeled index (every process's batch)."""
        indices, pseudo = all_gather_cat(indices.long()), all_gather_cat(pseudo.long())
        indices = indices.to(self.latest_pseudo.device)
        size = int(indices.max()) + 1
        if size > len(self.latest_pseudo):
            grown = self.latest_pseudo.new_full((size,), -1)
            grown[:len(self.latest_pseudo)] = self.latest_pseudo
            self.latest_pseudo = grown
        self.latest_pseudo[indices] = pseudo.to(self.latest_pseudo.device)

    @torch.no_grad()
    def end_epoch(self, step: int) -> None:
        """After an epoch's last step: unlabeled weights from the pseudo-label counts."""
        if (step + 1) % self.cfg.epoch_iters != 0:
            return
        seen = self.latest_pseudo[self.latest_pseudo >= 0]
        counts = torch.bincount(seen, minlength=self.num_classes)
        self.unlabeled_weights.copy_(effective_weights(counts, self.cfg.beta, self.cfg.normalize))

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        probe_logs, (logits_x, _), (logits_w, feats_w), (logits_s, feats_s) = \
            self.forward_views(batch, state)
        # L_x = 1/B sum w^x[y_b] H(y_b, p(x_b))  (official SemiLoss Lx)
        loss_x = weighted_cross_entropy(self.labeled_logits(logits_x), batch.y_lb,
                                        self.labeled_weights)
        with torch.no_grad():
            probs, linear = self.weak_view_probs(logits_w, feats_w, state.step)
            mask, pseudo = fixmatch_mask(probs, cfg.threshold)
            self.record(batch.idx_ulb, pseudo)
        self.refiner.observe(pseudo)
        # L_u = 1/(mu B) sum w^u[q_b] 1(max p >= tau) H(q_b, p(A(u_b)))  (official SemiLoss Lu)
        loss_u = weighted_cross_entropy(logits_s, pseudo, self.unlabeled_weights, mask)
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "saw/weight_max": self.unlabeled_weights.max(),
                "saw/weight_min": self.unlabeled_weights.min(), "pseudo/linear": linear,
                "pseudo/final": pseudo, "pseudo/mask": mask, **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        self.end_epoch(state.step)
        return loss, logs
