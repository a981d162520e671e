"""SimMatch (Zheng et al., CVPR 2022): semantic (FixMatch-style) and instance similarity
matching against a labeled memory bank, with label unfolding and aggregation (Sec. 3.3).

Following the official code and USB: projection head Linear(D, D)-ReLU-Linear(D, 128) with
L2-normalised output; the bank holds, per labeled image, the teacher's embedding of its
latest labeled view (updated at ``batch.idx_lb``, each entry L2-normalised on its own; USB's
CIFAR bank update normalises across the batch instead, so its entries drift off the unit
sphere: not followed). One ``teacher`` gives both the bank entries and the weak-view
quantities (p^w, the weak embedding):

* ``teacher=online`` (default): the online model's detached outputs, USB's CIFAR setting
  (``use_ema_teacher = False`` for CIFAR/SVHN/STL in USB's simmatch.py);
* ``teacher=ema``: the EMA model, as the official SimMatch (ImageNet) and USB's ImageNet
  setting; one extra EMA forward of the weak view.

Aggregation is the code's smoothing p^ = alpha p + (1 - alpha) q^agg. Here the bank is
updated with the current labeled batch *before* it is read, and slots not yet written are
masked out, so the bank never holds random embeddings (the official code starts from random
ones and skips the instance terms in the first epoch).

Distribution alignment: SimMatch's official code and USB align to the *uniform* distribution.
Under gamma 100 that target pushes the pseudo-labels hard toward the tail classes (a head
image's p^w is scaled by 1 / its running mean); ``dist_align=labeled`` (the labeled class
frequencies, ReMixMatch's target) is the alternative for long-tailed data.

DASO (no SimMatch variant exists): the refiner blends the weak-view semantic probabilities
after softmax/distribution alignment and BEFORE unfolding and aggregation. That is where
DASO acts in FixMatch (on the classifier's probabilities, before the threshold), and doing
it upstream lets the debiased semantic prediction propagate into both the instance target
(unfolding scales the similarity to each bank entry by p of that entry's class) and the
final pseudo-label (aggregation), on which the 0.95 threshold is applied as in SimMatch.
Its alignment loss uses the backbone features of the weak and strong views, as in DASO.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState, forward_all
from imbssl.algorithms.ops import fp32, one_hot, soft_cross_entropy, weak_view_probs
from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import add_extra_loss, hard_labels
from imbssl.pseudo.dist_align import build_dist_align

_MASKED = -1e9  # similarity logit of bank slots not yet written (softmax weight 0)


@dataclass
class SimMatchConfig(AlgorithmConfig):
    name: str = "simmatch"
    uratio: int = 2  # mu (DASO protocol for FixMatch-family; SimMatch/USB CIFAR: 7)
    threshold: float = 0.95  # tau (SimMatch CIFAR; USB p_cutoff)
    lambda_u: float = 1.0  # semantic loss weight (USB ulb_loss_ratio)
    lambda_in: float = 1.0  # instance loss weight (SimMatch CIFAR; USB in_loss_ratio)
    temperature: float = 0.1  # t of the instance similarities (USB CIFAR T; official tt=st=0.1)
    smoothing_alpha: float = 0.9  # alpha of label aggregation (USB; official c_smooth)
    proj_dim: int = 128  # embedding size (SimMatch; USB proj_size)
    dist_align: str = "uniform"  # uniform | labeled | none (official --DA, USB: uniform)
    dist_align_window: int = 32  # batches in p~(y) (USB CIFAR da_len; official ImageNet: 256)
    teacher: str = "online"  # online (USB CIFAR) | ema (official SimMatch / USB ImageNet)


def projection_head(feat_dim: int, proj_dim: int) -> nn.Sequential:
    """Linear(D, D)-ReLU-Linear(D, proj_dim), as in SimMatch's ``head``/USB's ``mlp_proj``."""
    return nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, proj_dim))


def propagate(probs: Tensor, sim: Tensor, bank_onehot: Tensor,
              alpha: float) -> tuple[Tensor, Tensor]:
    """Label unfolding and aggregation (Sec. 3.3).

    probs (B, C): semantic p^w; sim (B, N): instance similarities q^w over the bank; bank_onehot
    (N, C): labels of the bank. Returns (p^, the propagated semantic pseudo-label;
    q^, the instance pseudo-label).
    """
    probs, sim, bank_onehot = probs.float(), sim.float(), bank_onehot.float()
    with fp32(probs):
        unfolded = probs @ bank_onehot.t()  # p^unfold_i = p^w_class(i)
        q_hat = sim * unfolded  # q^_i = q_i p^unfold_i / sum_j q_j p^unfold_j
        q_hat = q_hat / q_hat.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        aggregated = sim @ bank_onehot  # q^agg_c = sum_i 1(class(i) = c) q_i
    p_hat = alpha * probs + (1 - alpha) * aggregated  # official code's smoothing (c_smooth)
    return p_hat, q_hat


@register("simmatch")
class SimMatch(Algorithm):
    """Semantic pseudo-labels and instance similarities propagated through a labeled bank."""

    Config = SimMatchConfig
    unlabeled_views = ("weak", "strong")

    TEACHERS = ("online", "ema")

    def __init__(self, cfg: SimMatchConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        if cfg.teacher not in self.TEACHERS:
            raise ValueError(f"algorithm.teacher must be one of {self.TEACHERS}, "
                             f"got {cfg.teacher!r}")
        self.dist_align = build_dist_align(cfg.dist_align, num_classes, self.labeled_prior,
                                           cfg.dist_align_window)
        n = self.num_labeled
        self.register_buffer("bank", torch.zeros(n, cfg.proj_dim))
        self.register_buffer("bank_filled", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("bank_labels", labeled_labels.detach().long().cpu().clone())

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {"projection": projection_head(feat_dim, cfg.proj_dim)}

    @torch.no_grad()
    def update_bank(self, batch: Batch, teacher: nn.Module, features: Tensor) -> None:
        """Write the teacher's L2-normalised embeddings of the labeled batch (its ``features``)
        at idx_lb (of every rank's share of the batch when training runs in several
        processes)."""
        emb = teacher.heads["projection"](features.detach())
        emb = all_gather_cat(F.normalize(emb.float(), dim=-1))
        idx = all_gather_cat(batch.idx_lb).to(self.bank.device).long()
        self.bank.index_copy_(0, idx, emb)
        self.bank_filled.index_fill_(0, idx, True)

    def similarities(self, emb: Tensor) -> Tensor:
        """Logits z . k_i / t over the bank (unwritten slots masked)."""
        with fp32(emb):
            logits = emb.float() @ self.bank.t() / self.cfg.temperature
        return logits.masked_fill(~self.bank_filled, _MASKED)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, model = self.cfg, state.model
        x_weak, x_strong = batch.x_ulb
        if cfg.teacher == "ema":
            with torch.no_grad():  # one EMA pass: bank, refiner queues and weak-view teacher
                (_, feats_lb_t), (logits_w, feats_w) = forward_all(
                    state.ema_model, batch.x_lb, x_weak)
            self.feed_refiner(batch, state, feats_lb_t)
            self.update_bank(batch, state.ema_model, feats_lb_t)
            (logits_x, _), (logits_s, feats_s) = forward_all(model, batch.x_lb, x_strong)
            teacher = state.ema_model
        else:
            self.feed_refiner(batch, state)  # DASO's queues: EMA features (when it has them)
            (logits_x, feats_lb_t), (logits_w, feats_w), (logits_s, feats_s) = forward_all(
                model, batch.x_lb, x_weak, x_strong)
            self.update_bank(batch, model, feats_lb_t)
            teacher = model
        loss_x = self.labeled_loss(logits_x, batch.y_lb)  # L_s (+LA)
        emb_s = F.normalize(model.heads["projection"](feats_s).float(), dim=-1)

        with torch.no_grad():
            # p^w, aligned and refined; linear = argmax of the raw p^w
            probs, linear = weak_view_probs(logits_w, feats_w, state.step, self.refiner,
                                            self.dist_align)
            emb_w = F.normalize(teacher.heads["projection"](feats_w.detach()).float(), dim=-1)
            sim_w = torch.softmax(self.similarities(emb_w), dim=-1)  # q^w (Sec. 3.2)
            bank_onehot = one_hot(self.bank_labels, self.num_classes)
            p_hat, q_hat = propagate(probs, sim_w, bank_onehot, cfg.smoothing_alpha)
            conf, pseudo = hard_labels(p_hat)
            mask = conf.ge(cfg.threshold).float()
        self.refiner.observe(pseudo)

        # L_u = 1/(mu B) sum 1(max p^ >= tau) H(p^, p^s)  (Sec. 3.1 with the propagated p^)
        loss_u = (soft_cross_entropy(logits_s, p_hat) * mask).mean()
        # L_in = 1/(mu B) sum H(q^, q^s), q^s = softmax over the bank of the strong embedding
        loss_in = -(q_hat * F.log_softmax(self.similarities(emb_s), dim=-1)).sum(-1).mean()
        loss = loss_x + cfg.lambda_u * loss_u + cfg.lambda_in * loss_in
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "loss/instance": loss_in.detach(), "mask/ratio": mask.mean(),
                "pseudo/linear": linear, "pseudo/final": pseudo, "pseudo/mask": mask}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
