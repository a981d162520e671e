"""DebiasPL (Wang et al., CVPR 2022, "Debiased Learning from Naturally Imbalanced
Pseudo-Labels") on FixMatch, following the official ``main_DebiasPL.py``
(``causal_inference``, ``update_qhat`` and the non-multiview branch of ``train``) of
github.com/frank-xwang/debiased-pseudo-labeling.

``q_hat``, a momentum estimate of the network's mean prediction on the unlabeled data
(uniform at first), is the pseudo-labels' bias:

* counterfactual (debiased) pseudo-label: ``softmax(f(alpha(u)) - tau log q_hat)`` with the
  ``q_hat`` of before this step; its argmax, kept where its maximum is ``>= threshold``
  (official ``causal_inference``);
* ``q_hat <- m q_hat + (1 - m) mean_b softmax(f(alpha(u_b)))`` (official ``update_qhat``,
  unmasked: ``--masked-qhat`` off);
* adaptive margin loss: the strong view's logits ``f(A(u)) + tau log q_hat`` (the updated
  ``q_hat``) in the masked cross-entropy (official "adaptive marginal loss").

Differs from the official code: nothing in the computation; the official multi-view (two
weak/strong crops) and CLD loss are options of its ImageNet scripts and are not part of
imbssl's DebiasPL. Under ``torch.distributed`` ``q_hat`` moves with the mean over every
process's batch (the official code keeps one per process). ``q_hat`` is a buffer, so a
checkpoint resumes exactly. USB's port (``semilearn/imb_algorithms/debiaspl``) differs: its
``compute_prob`` averages the probabilities over all entries (``probs.mean()``, a scalar),
multiplies by ``ema_m`` (the EMA decay) instead of ``ema_p``, and its consistency loss fixes
``tau`` at 0.4 whatever the argument.

With ``pseudo=daso`` the debiased probabilities are refined (blended) before the mask and
label; distribution alignment, if on, also applies to them.

Diagnostics: ``pseudo/linear`` the raw argmax, ``pseudo/final`` the debiased (refined)
pseudo-label and ``pseudo/mask``; ``debiaspl/qhat_max`` / ``debiaspl/qhat_min``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Batch, StepState, reject_setting
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig, fixmatch_mask
from imbssl.algorithms.ops import aligned_refined_probs
from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import add_extra_loss


@dataclass
class DebiasPLConfig(FixMatchConfig):
    name: str = "debiaspl"
    uratio: int = 2  # mu (DASO protocol; official ImageNet scripts: --mu 5)
    threshold: float = 0.95  # (FixMatch's CIFAR value, USB's port; official ImageNet scripts: 0.8)
    lambda_u: float = 1.0  # (FixMatch; official argparse --lambda-u 10 for ImageNet)
    debias_tau: float = 0.4  # tau of the debiasing and the margin (official scripts --tau 0.4)
    qhat_momentum: float = 0.999  # momentum of q_hat (official --qhat_m 0.999)


def debiased_probs(logits: Tensor, qhat: Tensor, tau: float) -> Tensor:
    """``softmax(logits - tau log q_hat)`` (official ``causal_inference``)."""
    return torch.softmax(logits - tau * torch.log(qhat), dim=-1)


def updated_qhat(qhat: Tensor, probs: Tensor, momentum: float) -> Tensor:
    """``m q_hat + (1 - m) mean_b probs_b`` (official ``update_qhat``, unmasked)."""
    return momentum * qhat + (1 - momentum) * probs.mean(dim=0)


def margin_loss(logits_s: Tensor, pseudo: Tensor, mask: Tensor, qhat: Tensor,
                tau: float) -> Tensor:
    """``1/(mu B) sum_b mask_b H(pseudo_b, softmax(f(A(u_b)) + tau log q_hat))`` (official
    adaptive marginal loss)."""
    adjusted = logits_s.float() + tau * torch.log(qhat)
    return (F.cross_entropy(adjusted, pseudo, reduction="none") * mask).mean()


@register("debiaspl")
class DebiasPL(FixMatch):
    """FixMatch with counterfactually debiased pseudo-labels and an adaptive margin loss."""

    Config = DebiasPLConfig

    def __init__(self, cfg: DebiasPLConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "debias_tau", ">= 0", when=cfg.debias_tau < 0)
        reject_setting(cfg, "qhat_momentum", "in [0, 1)", when=not 0 <= cfg.qhat_momentum < 1)
        #: q_hat, the pseudo-label bias (official initial_qhat: uniform)
        self.register_buffer("qhat", torch.full((num_classes,), 1.0 / num_classes))

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        probe_logs, (logits_x, _), (logits_w, feats_w), (logits_s, feats_s) = \
            self.forward_views(batch, state)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)

        with torch.no_grad():
            weak = logits_w.detach().float()
            raw = torch.softmax(weak, dim=-1)
            probs = debiased_probs(weak, self.qhat, cfg.debias_tau)  # with last step's q_hat
            probs = aligned_refined_probs(probs, feats_w, state.step, self.refiner,
                                          self.dist_align)
            mask, pseudo = fixmatch_mask(probs, cfg.threshold)
            self.qhat.copy_(updated_qhat(self.qhat, all_gather_cat(raw), cfg.qhat_momentum))
        self.refiner.observe(pseudo)

        loss_u = margin_loss(logits_s, pseudo, mask, self.qhat, cfg.debias_tau)
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "debiaspl/qhat_max": self.qhat.max(),
                "debiaspl/qhat_min": self.qhat.min(), "pseudo/linear": raw.argmax(dim=-1),
                "pseudo/final": pseudo, "pseudo/mask": mask, **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
