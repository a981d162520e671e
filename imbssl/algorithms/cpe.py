"""CPE: Complementary Experts (Ma et al., AAAI 2024, "Three Heads Are Better than One:
Complementary Experts for Long-Tailed Semi-Supervised Learning"), following the official
``semilearn/imb_algorithms/cpe/cpe.py`` and ``semilearn/nets/wrn/wrn_cbn.py`` of
github.com/machengcheng2016/CPE-LTSSL (a USB fork).

Three experts (linear classifiers on the shared features) are FixMatch learners whose
labeled losses are logit-adjusted with different strengths ``tau_e`` (paper Sec. 3.2, Eq. 3;
official ``la_tau_lb1/2/3`` = 0, 2, 4), so each fits a different class distribution of the
unlabeled set: long-tailed (``tau = 0``, the network's own classifier), uniform (``tau = 2``,
the head ``cpe_uniform``) and inverse (``tau = 4``, the head ``cpe_inverse``):

* labeled: ``L_s^e = 1/B sum_b H(y_b, f_e(x_b) + tau_e log pi)``, pi the labeled class
  frequencies;
* unlabeled: each expert's own weak-view prediction ``p_e = softmax(f_e(alpha(u)))`` gives
  its pseudo-label ``argmax p_e``, kept when ``max p_e >= threshold`` (official
  ``compute_prob`` and ``p_cutoff``), the target of its strong-view logits;
* total: ``sum_e L_s^e + lambda_u L_u^e`` (official ``total_loss``); evaluation argmaxes the
  uniform expert (official ``evaluate(out_key='logits_2')``).

Classwise batch normalisation (CBN, paper Sec. 3.3; ``model.classwise_bn=3``, see
``imbssl.models.base.ClasswiseNorms``): the last feature map goes through three batch-norm
layers (head, medium, tail); each expert's logits are the mean over the three branches. The
unlabeled loss of an expert trains branch ``j`` only on the pseudo-labels of classes
``>= cuts[j]`` (``cuts = (0, cut1, cut2)``; official ``pseudo_labelH/M/T`` with ``cut1``,
``cut2``: 2, 4 on CIFAR-10, 35, 70 on CIFAR-100), normalised by the total weight:
``L_u^e = sum_j sum_b w_jb H(q_b, f_e^j(A(u_b))) / (sum_jb w_jb + 1e-12)``,
``w_jb = 1(max p_e >= t) 1(q_b >= cuts[j])``. Without CBN (``classwise_bn=0``) the network
has one branch and this is FixMatch's loss normalised by the number of kept images.

State: per expert, running shares of its pseudo-labels over the classes (official
``u_py`` of the confident ones, ``au_py`` of all; ``update_stuff``, momentum ``ema_u``),
updated after ``estimate_after_epochs`` epochs of ``epoch_iters`` steps (official
``self.epoch > est_epoch``, USB epochs of 1024 steps). They do not change training (the
official code only logs them); imbssl writes them to per_class.csv (kind ``cpe``). The
official shares of the *true* labels (``g_py``) and the per-class precision/recall need the
unlabeled labels, which an algorithm never sees: the trainer's pseudo-label diagnostics give
them for the uniform expert (``pseudo/...``). Buffers, so a checkpoint resumes exactly.

Logit adjustment (``algorithm.logit_adjust``) is refused: CPE adjusts its own logits.
``pseudo=darp`` is refused (one line, exit 2): DARP refines one prediction per step and
image, CPE has three experts' predictions.
With ``pseudo=daso`` every expert's weak-view probabilities are refined (one semantic
pseudo-label: the experts share the features), the uniform expert's final pseudo-labels are
observed (DASO's ``m_hat``) and the alignment loss takes the shared (branch-mean) features.

Diagnostics: ``pseudo/linear``, ``pseudo/final``, ``pseudo/mask`` are the uniform expert's
(raw argmax, refined pseudo-label, its mask), as the official log reports expert 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
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
from imbssl.collectives import all_gather_cat, all_reduce_mean
from imbssl.errors import UserError
from imbssl.pseudo.base import IdentityRefiner, add_extra_loss, hard_labels
from imbssl.pseudo.daso import DASO

#: the experts in order: the network's classifier, then two heads
EXPERTS = ("long_tailed", "uniform", "inverse")
HEADS = {"uniform": "cpe_uniform", "inverse": "cpe_inverse"}
EVALUATED = "uniform"  # official evaluate(out_key='logits_2')


@dataclass
class CPEConfig(AlgorithmConfig):
    name: str = "cpe"
    uratio: int = 2  # mu (official configs uratio: 2)
    threshold: float = 0.95  # confidence threshold (official configs p_cutoff: 0.95)
    lambda_u: float = 1.0  # (official configs ulb_loss_ratio: 1.0)
    #: tau of each expert's logit-adjusted labeled loss (official la_tau_lb1/2/3: 0, 2, 4)
    expert_taus: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0])
    #: first class of the medium and tail CBN branches (official cut1, cut2: 2, 4 on CIFAR-10)
    cuts: list[int] = field(default_factory=lambda: [2, 4])
    share_momentum: float = 0.9  # momentum of the pseudo-label shares (official --ema_u 0.9)
    epoch_iters: int = 1024  # steps per epoch (official num_train_iter / epoch = 262144 / 256)
    estimate_after_epochs: int = 0  # shares update after this epoch (official --est_epoch 0)


class ExpertResult(NamedTuple):
    """One expert's step: labeled and unlabeled loss, raw and final weak-view labels, mask."""

    loss_x: Tensor
    loss_u: Tensor
    linear: Tensor
    pseudo: Tensor
    mask: Tensor


def expert_labeled_loss(logits_x: Tensor, y: Tensor, prior: Tensor, tau: float) -> Tensor:
    """``1/B sum_b H(y_b, f(x_b) + tau log pi)`` (official ``sup_loss``)."""
    return F.cross_entropy(logits_x.float() + tau * torch.log(prior), y)


def branch_weights(labels: Tensor, mask: Tensor, cuts: list[int], branches: int) -> Tensor:
    """(branches, B) weights ``w_jb = mask_b 1(label_b >= cut_j)`` with ``cut_0 = 0``
    (official ``pseudo_labelH/M/T``: ``one_hot(label)[:, cut:].sum(1) * mask``)."""
    firsts = [0, *cuts][:branches]
    return torch.stack([mask * labels.ge(c).float() for c in firsts])


def branch_consistency_loss(branch_logits_s: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """``sum_jb w_jb H(q_b, f^j(A(u_b))) / (sum_jb w_jb + 1e-12)`` (official ``unsup_loss``).
    Under ``torch.distributed`` the denominator is the ranks' mean weight, so the mean of the
    ranks' losses is the global batch's loss."""
    n, b, k = branch_logits_s.shape
    ce = F.cross_entropy(branch_logits_s.float().reshape(n * b, k), labels.repeat(n),
                         reduction="none").view(n, b)
    return (ce * weights).sum() / (all_reduce_mean(weights.sum()) + 1e-12)


def updated_share(share: Tensor, labels: Tensor, keep: Tensor | None, momentum: float) -> Tensor:
    """``m share + (1 - m) c / sum c`` with ``c`` the per-class count of ``labels`` (of the
    kept ones); ``share`` unchanged when none is kept (official ``update_stuff``)."""
    weights = torch.ones_like(labels, dtype=torch.float) if keep is None else keep.float()
    counts = torch.zeros_like(share).index_add_(0, labels, weights)
    total = counts.sum()
    new = momentum * share + (1 - momentum) * counts / total.clamp_min(1e-12)
    return torch.where(total > 0, new, share)


@register("cpe")
class CPE(Algorithm):
    """Three logit-adjusted FixMatch experts; the uniform one is evaluated."""

    Config = CPEConfig
    unlabeled_views = ("weak", "strong")

    def __init__(self, cfg: CPEConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        refuse_logit_adjust(cfg, "cpe", "adjusts its experts' logits itself")
        one_per_step = refiner is not None and type(refiner) is not IdentityRefiner
        if one_per_step and not isinstance(refiner, DASO):
            raise UserError(f"algorithm=cpe refines the pseudo-labels of each of its three "
                            f"experts; {type(refiner).__name__} refines one prediction per "
                            "step: use pseudo=none or pseudo=daso")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "expert_taus", "three values >= 0",
                       when=len(cfg.expert_taus) != 3 or min(cfg.expert_taus) < 0)
        # a cut >= K leaves its branch without pseudo-labels (official one_hot(...)[:, cut:])
        reject_setting(cfg, "cuts", "two non-decreasing class indices >= 0",
                       when=len(cfg.cuts) != 2 or not 0 <= cfg.cuts[0] <= cfg.cuts[1])
        reject_setting(cfg, "threshold", "in [0, 1]", when=not 0 <= cfg.threshold <= 1)
        reject_setting(cfg, "share_momentum", "in [0, 1)", when=not 0 <= cfg.share_momentum < 1)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        reject_setting(cfg, "estimate_after_epochs", ">= 0", when=cfg.estimate_after_epochs < 0)
        if bool((self.labeled_prior == 0).any()):
            raise UserError("algorithm=cpe needs every class in the labeled set (its logit "
                            "adjustment takes log pi); raise dataset.n1")
        uniform = torch.full((len(EXPERTS), num_classes), 1.0 / num_classes)
        #: per expert: share of each class among its confident pseudo-labels (official u_py)
        self.register_buffer("confident_share", uniform.clone())
        #: per expert: share of each class among all its pseudo-labels (official au_py)
        self.register_buffer("all_share", uniform.clone())

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        # official CBNNet: nn.Linear(num_features, num_classes), PyTorch's default initialisation
        return {HEADS[e]: nn.Linear(feat_dim, num_classes) for e in EXPERTS[1:]}

    def configure_network(self, model: nn.Module) -> None:
        norms = getattr(model, "classwise_norms", None)
        branches = 1 if norms is None else len(norms.norms)
        if branches not in (1, len(self.cfg.cuts) + 1):
            raise UserError(f"algorithm=cpe trains {len(self.cfg.cuts) + 1} classwise "
                            f"batch-norm branches (or none); model.classwise_bn={branches}")

    def eval_predictor(self, model: nn.Module):
        head = model.heads[HEADS[EVALUATED]]
        return lambda output: head(output.features)  # linear: the mean over the branches

    def _expert_logits(self, model: nn.Module, out) -> list[Tensor]:
        """(branches, N, K) logits of each expert (one branch without CBN)."""
        feats = getattr(out, "branch_features", out.features.unsqueeze(0))
        first = getattr(out, "branch_logits", out.logits.unsqueeze(0))
        return [first, *(model.heads[HEADS[e]](feats) for e in EXPERTS[1:])]

    def _estimating(self, step: int) -> bool:
        return step // self.cfg.epoch_iters > self.cfg.estimate_after_epochs

    @torch.no_grad()
    def _update_shares(self, expert: int, labels: Tensor, mask: Tensor) -> None:
        labels, mask = all_gather_cat(labels), all_gather_cat(mask)
        m = self.cfg.share_momentum
        self.confident_share[expert] = updated_share(self.confident_share[expert], labels, mask, m)
        self.all_share[expert] = updated_share(self.all_share[expert], labels, None, m)

    def expert_step(self, expert: int, logits: Tensor, sizes: list[int], y_lb: Tensor,
                    feats_w: Tensor, step: int) -> ExpertResult:
        """One expert's losses from its (branches, N, K) logits of the labeled, weak and
        strong images (sizes ``sizes``), and its share update (official ``train_step``, one
        of the three heads)."""
        cfg = self.cfg
        branch_x, branch_w, branch_s = logits.split(sizes, dim=1)
        loss_x = expert_labeled_loss(branch_x.mean(0), y_lb, self.labeled_prior,
                                     cfg.expert_taus[expert])
        with torch.no_grad():  # q = argmax p_e, p_e = softmax(f_e(alpha(u))) (official compute_prob)
            probs = torch.softmax(branch_w.mean(0).detach().float(), dim=-1)
            linear = probs.argmax(dim=-1)
            probs = self.refiner.refine(probs, feats_w.detach(), step)
            conf, pseudo = hard_labels(probs)
            mask = conf.ge(cfg.threshold).float()
            weights = branch_weights(pseudo, mask, cfg.cuts, len(branch_s))
            if self._estimating(step):
                self._update_shares(expert, pseudo, mask)
        loss_u = branch_consistency_loss(branch_s, pseudo, weights)
        return ExpertResult(loss_x, loss_u, linear, pseudo, mask)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, model = self.cfg, state.model
        self.feed_refiner(batch, state)
        x_w, x_s = batch.x_ulb
        sizes = [len(batch.x_lb), len(x_w), len(x_s)]
        out = model(torch.cat([batch.x_lb, x_w, x_s]))
        feats_w, feats_s = out.features.split(sizes)[1:]
        loss = torch.zeros((), device=batch.y_lb.device)
        logs: dict[str, Tensor] = {}
        for e, (name, logits) in enumerate(zip(EXPERTS, self._expert_logits(model, out),
                                                strict=True)):
            r = self.expert_step(e, logits, sizes, batch.y_lb, feats_w, state.step)
            loss = loss + r.loss_x + cfg.lambda_u * r.loss_u  # official total_loss
            logs.update({f"loss/{name}_labeled": r.loss_x.detach(),
                         f"loss/{name}_unlabeled": r.loss_u.detach(),
                         f"mask/{name}_ratio": r.mask.mean()})
            if name == EVALUATED:
                logs.update({"pseudo/linear": r.linear, "pseudo/final": r.pseudo,
                             "pseudo/mask": r.mask, "mask/ratio": r.mask.mean()})
        self.refiner.observe(logs["pseudo/final"])  # after every expert's refine
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        parts = super().per_class_diagnostics()
        shares = {f"{name}_{kind}_share": buf[e].clone()
                  for e, name in enumerate(EXPERTS)
                  for kind, buf in (("confident", self.confident_share),
                                    ("all", self.all_share))}
        return {**parts, "cpe": shares}
