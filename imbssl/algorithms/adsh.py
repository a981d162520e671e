"""Adsh: adaptive thresholding (Guo and Li, ICML 2022, "Class-Imbalanced Semi-Supervised
Learning with Adaptive Thresholding"), following the official ``algorithms/fixmatch.py``
(class ``ADSH``) and ``train.py`` (``update_s``) of github.com/guolz-ml/Class-Imbalanced-SSL.

FixMatch whose fixed threshold becomes a per-class score ``s_k``:

* selection (official ``ADSH.forward``): the weak view's probabilities are rectified,
  ``p_k / s_k``; the pseudo-label is ``argmax_k p_k / s_k`` and it is kept when
  ``max_k p_k / s_k >= 1``. With every ``s_k = tau`` this is FixMatch.
* scores (official ``update_s``, at the start of every epoch after the second): with the
  confidences ``C_k`` of the images predicted as class ``k``, sorted in descending order,
  ``rho`` is the fraction of the head class's confidences ``>= tau`` (1 when there is none)
  and every other class gets ``s_k = min(tau, C_k[round(|C_k| rho) - 1])`` (unchanged when
  ``C_k`` is empty), so each class keeps the same fraction of its predictions as the head.
  The head's score stays ``tau``.

Differs from the official code: the confidences are the ones the steps of the previous epoch
saw on the weak views of their unlabeled batches (the training network, as the step computes
them), not a separate pass of the network in eval mode over the whole unlabeled set; the
engine has no such pass for an algorithm that keeps its labeled set. The head class is the
most frequent labeled class (official: class 0, the head of its long-tailed splits). The
epoch's records and the scores live in buffers, so a checkpoint resumes exactly.
USB's port (``semilearn/imb_algorithms/adsh``) differs from the official code: it thresholds
``max p`` against ``exp(-s)`` at ``argmax p`` (no rectified argmax), updates the head class
too, takes ``rho = i / |C_0|`` and does not clip the scores at ``tau``; imbssl follows the
authors' code.

With ``pseudo=daso`` (and distribution alignment) the probabilities are refined before the
selection, and the epoch's confidences are those of the refined probabilities (the ones the
scores threshold).

Diagnostics: ``pseudo/linear`` is the raw argmax, ``pseudo/final`` the rectified argmax and
``pseudo/mask`` the selection; ``adsh/rho`` the head's kept fraction of the last update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Batch, StepState, reject_setting
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig
from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import add_extra_loss, hard_labels


@dataclass
class AdshConfig(FixMatchConfig):
    name: str = "adsh"
    uratio: int = 2  # mu (official train.py --mu 2)
    threshold: float = 0.95  # tau, the head class's threshold (official --threshold 0.95)
    lambda_u: float = 1.0  # (official --lambda_u 1)
    epoch_iters: int = 512  # steps per epoch, the score update period (official --eval_steps 512)
    update_after_epochs: int = 1  # scores update from the epoch after this one (official epoch > 1)


def rectified_selection(probs: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """(float mask ``max_k p_k / s_k >= 1``, label ``argmax_k p_k / s_k``) of (B, K)
    probabilities (official ``ADSH.forward``: ``rectify_prob = probs / score``)."""
    rectified = probs / scores
    top, labels = torch.max(rectified, dim=-1)
    return top.ge(1.0).float(), labels


def head_fraction(head_conf: Tensor, threshold: float) -> float:
    """rho: the fraction of the head class's confidences ``>= threshold``; 1.0 when none is
    (official ``update_s``: the loop leaves ``rho = 1.0`` if the largest is below tau)."""
    kept = int(head_conf.ge(threshold).sum())
    return kept / len(head_conf) if kept > 0 else 1.0


@torch.no_grad()
def adaptive_scores(conf: Tensor, pred: Tensor, scores: Tensor, threshold: float,
                    head: int) -> tuple[Tensor, float]:
    """New per-class scores and rho from the confidences ``conf`` and predictions ``pred``
    (official ``update_s``): ``s_k = min(tau, C_k[max(0, round(|C_k| rho - 1))])`` for every
    class but the head, ``C_k`` sorted in descending order; empty classes keep theirs."""
    new = scores.clone()
    rho = head_fraction(conf[pred == head], threshold)
    for k in range(len(scores)):
        ranked = torch.sort(conf[pred == k], descending=True).values
        if k == head or len(ranked) == 0:  # the head keeps tau; an empty class its score
            continue
        idx = max(0, round(len(ranked) * rho - 1))  # half to even, as np.round
        new[k] = min(threshold, float(ranked[idx]))
    return new, rho


@register("adsh")
class Adsh(FixMatch):
    """FixMatch with per-class thresholds adapted to keep the head class's fraction."""

    Config = AdshConfig

    def __init__(self, cfg: AdshConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        reject_setting(cfg, "update_after_epochs", ">= 0", when=cfg.update_after_epochs < 0)
        reject_setting(cfg, "threshold", "in (0, 1]", when=not 0 < cfg.threshold <= 1)
        self.head = int(self.labeled_prior.argmax())
        #: s_k (official ``score = np.zeros(num_classes) + threshold``)
        self.register_buffer("scores", torch.full((num_classes,), float(cfg.threshold)))
        self.register_buffer("rho", torch.tensor(1.0))
        #: this epoch's weak-view confidences and predictions, ``epoch_count`` of them
        self.register_buffer("epoch_conf", torch.zeros(0))
        self.register_buffer("epoch_pred", torch.zeros(0, dtype=torch.long))
        self.register_buffer("epoch_count", torch.tensor(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("epoch_conf", "epoch_pred"):  # sized by the first batch: take the saved size
            if prefix + name in state_dict:
                saved = state_dict[prefix + name]
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def start_epoch(self, step: int) -> None:
        """At an epoch's first step: new scores from the previous epoch's records (after
        ``update_after_epochs``), then the records restart."""
        cfg = self.cfg
        if step % cfg.epoch_iters != 0:
            return
        if step // cfg.epoch_iters > cfg.update_after_epochs:
            n = int(self.epoch_count)
            scores, rho = adaptive_scores(self.epoch_conf[:n], self.epoch_pred[:n], self.scores,
                                          cfg.threshold, self.head)
            self.scores.copy_(scores)
            self.rho.fill_(rho)
        self.epoch_count.zero_()

    @torch.no_grad()
    def record(self, conf: Tensor, pred: Tensor) -> None:
        """Append a batch's confidences and predictions (every process's, so all agree)."""
        conf, pred = all_gather_cat(conf.float()), all_gather_cat(pred.long())
        n, need = int(self.epoch_count), int(self.epoch_count) + len(conf)
        if need > len(self.epoch_conf):  # room for the epoch at the first batch's size
            size = max(need, self.cfg.epoch_iters * len(conf))
            self.epoch_conf = torch.cat([self.epoch_conf, conf.new_zeros(size - len(self.epoch_conf))])
            self.epoch_pred = torch.cat([self.epoch_pred, pred.new_zeros(size - len(self.epoch_pred))])
        self.epoch_conf[n:need] = conf
        self.epoch_pred[n:need] = pred
        self.epoch_count.fill_(need)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        self.start_epoch(state.step)
        probe_logs, (logits_x, _), (logits_w, feats_w), (logits_s, feats_s) = \
            self.forward_views(batch, state)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)

        with torch.no_grad():
            probs, linear = self.weak_view_probs(logits_w, feats_w, state.step)
            self.record(*hard_labels(probs))
            mask, pseudo = rectified_selection(probs, self.scores)
        self.refiner.observe(pseudo)

        # l_u = 1/(mu B) sum 1(max_k p_k / s_k >= 1) H(argmax_k p_k / s_k, p(y | A(u)))
        loss_u = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "adsh/rho": self.rho.clone(),
                "pseudo/linear": linear, "pseudo/final": pseudo, "pseudo/mask": mask,
                **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
