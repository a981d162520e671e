"""TRAS: Transfer and Share (Wei, Liu, Shi, Tu and Guo, "Transfer and Share: Semi-Supervised
Learning from Long-Tailed Data", Machine Learning 2024, arXiv 2205.13358), following the
authors' ``train.py`` (github.com/Stomach-ache/TRAS, functions ``train``, ``compute_adjustment``,
``balanced_softmax_loss``, ``KL``).

One backbone, two linear classifiers on its features (feature *sharing*): the teacher (the
network's classifier, official ``classify``) and the student (the head ``student``, official
``classify2``). With ``a = log(pi ** tro + 1e-12)`` (official ``compute_adjustment``; ``pi``
the labeled class frequencies) and the per-class transfer scale
``s = A softmax(-a) + B`` (official ``T_logit``):

* teacher, a FixMatch learner: ``CE(f(x), y)`` on the labeled batch; on each of the two strong
  views ``CE(f(u_s), argmax q)`` masked by ``max q >= threshold``, with the logit-adjusted
  weak-view prediction ``q = softmax(f(u_w) - a)`` (official ``targets_u2``); the mean over
  both strong views;
* student, after ``warmup_epochs`` epochs of ``epoch_iters`` steps (official ``epoch > 10``):
  the logit-adjusted labeled loss ``CE(g(x) + a, y)`` (official ``balanced_softmax_loss``) and
  the *transfer* loss on both strong views: the teacher's strong-view logits, shifted by the
  adjustment scaled at the student's own weak-view label ``y^ = argmax g(u_w)``,
  ``t = f(u_s) - s[y^] a`` (detached), softened at ``2T``, are the soft target of the
  student's logits at ``T``::

      L_t = -T^2 / (2 mu B) sum_i 1(max softmax(g(u_w)) >= threshold) sum_k
            softmax(t_i / 2T)_k log softmax(g(u_s,i) / T)_k       (official ``KL``)

  (a cross-entropy to the transferred distribution; the target's entropy is not subtracted);
* total: ``L_x + lambda_u L_u`` before, ``+ L_x^S + L_t`` after the warm-up (official
  ``Lx + Lu + loss_x_S + loss_u_S``);
* evaluation reads the student once it has trained, the teacher before (official
  ``validate``: ``classify2`` when ``epoch > 10``); the prediction that labels data is the
  teacher's logit-adjusted one (official ``targets_u2``).

Differs from the official code: one forward pass over the labeled, weak and two strong
batches (batch-norm statistics over their concatenation, as imbssl's FixMatch; official: four
separate passes, the weak one without gradient); the training recipe (official: Adam at
2e-3, 500 epochs of 500 steps, batch 64 for both sets, an EMA that also decays the online
weights by ``1 - 0.02 lr`` each step) is the run's ``optim``/``trainer`` config, not the
algorithm. USB's port (``semilearn/imb_algorithms/tras``) differs from the authors' code: the
student's target is its *own* weak-view logits, not the teacher's strong-view ones, on one
strong view, and the student starts after 10 epochs (``epoch < 10`` skipped) rather than 11;
imbssl follows the authors' code.

With ``pseudo=daso`` the teacher's logit-adjusted weak-view probabilities are refined (the
DASO blend) before its mask and label, its final labels are observed (``m_hat``) and DASO's
alignment loss uses strong view 1; the student's transfer is unchanged. Logit adjustment
(``algorithm.logit_adjust``) is refused: TRAS adjusts its own logits.

Diagnostics: ``pseudo/linear`` is the teacher's unadjusted argmax on the weak view,
``pseudo/final`` its adjusted (refined) label and ``pseudo/mask`` its mask; per class
(``per_class.csv``, kind ``tras``): the transfer scale ``s``, the adjustment ``a`` and the
number of the student's confident weak-view labels since the run's start.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.abc import linear_head
from imbssl.algorithms.base import Batch, StepState, refuse_logit_adjust, reject_setting
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig, fixmatch_mask
from imbssl.algorithms.ops import aligned_refined_probs, one_hot
from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import add_extra_loss, hard_labels

STUDENT_HEAD = "student"


@dataclass
class TRASConfig(FixMatchConfig):
    name: str = "tras"
    uratio: int = 1  # mu (official train.py: --batch-size 64 for both loaders)
    threshold: float = 0.95  # teacher's and student's selection (official ge(0.95), both)
    lambda_u: float = 1.0  # teacher's unlabeled weight (official Lx + Lu)
    tro: float = 1.0  # exponent of the prior in the adjustment (official --tro_train 1.0)
    transfer_a: float = 2.0  # A of the transfer scale (official --A 2)
    transfer_b: float = 2.0  # B of the transfer scale (official --B 2, commit f00889e)
    transfer_temperature: float = 1.0  # T of the transfer loss (official KL(..., 1, ...))
    epoch_iters: int = 500  # steps per epoch (official --val-iteration 500)
    warmup_epochs: int = 10  # the student trains in the epochs after this one (official epoch > 10)


def prior_adjustment(prior: Tensor, tro: float) -> Tensor:
    """``a = log(pi ** tro + 1e-12)`` (official ``compute_adjustment``)."""
    return torch.log(prior ** tro + 1e-12)


def transfer_scale(adjustment: Tensor, a: float, b: float) -> Tensor:
    """Per-class ``s = A softmax(-a) + B`` (official ``T_logit``): larger for rarer classes."""
    return a * torch.softmax(-adjustment, dim=0) + b


def transferred_logits(teacher_logits: Tensor, student_labels: Tensor, adjustment: Tensor,
                       scale: Tensor) -> Tensor:
    """``f(u) - s[y^] a`` row by row (official ``logits_u - la_u``): the teacher's logits
    moved towards the rare classes, as strongly as the student's label's scale says."""
    return teacher_logits - scale[student_labels].unsqueeze(1) * adjustment


def transfer_loss(student_logits: Tensor, target_logits: Tensor, mask: Tensor,
                  temperature: float) -> Tensor:
    """``-T^2 mean_i mask_i sum_k softmax(t_i / 2T)_k log softmax(z_i / T)_k`` (official
    ``KL``), the target ``t`` detached."""
    t = temperature
    log_p = F.log_softmax(student_logits.float() / t, dim=-1)
    q = torch.softmax(target_logits.detach().float() / (2 * t), dim=-1)
    return -((q * log_p).sum(dim=-1) * mask).mean() * t * t


def adjusted_labeled_loss(logits: Tensor, labels: Tensor, adjustment: Tensor) -> Tensor:
    """``CE(g(x) + a, y)`` (official ``balanced_softmax_loss`` with the adjustments)."""
    return F.cross_entropy(logits.float() + adjustment, labels)


def two_view_ce(logits_s1: Tensor, logits_s2: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over both strong views of the masked CE (official ``SemiLoss``'s ``Lu`` on the
    concatenated views)."""
    ce = torch.cat([F.cross_entropy(logits_s1.float(), targets, reduction="none"),
                    F.cross_entropy(logits_s2.float(), targets, reduction="none")])
    return (ce * torch.cat([mask, mask])).mean()


@register("tras")
class TRAS(FixMatch):
    """FixMatch teacher with logit-adjusted pseudo-labels and a balanced student head that
    learns the teacher's transferred distribution; the backbone is shared."""

    Config = TRASConfig
    unlabeled_views = ("weak", "strong", "strong")

    def __init__(self, cfg: TRASConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        refuse_logit_adjust(cfg, "tras", "adjusts its logits itself")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        reject_setting(cfg, "warmup_epochs", ">= 0", when=cfg.warmup_epochs < 0)
        reject_setting(cfg, "tro", ">= 0", when=cfg.tro < 0)
        reject_setting(cfg, "transfer_temperature", "> 0", when=cfg.transfer_temperature <= 0)
        reject_setting(cfg, "threshold", "in [0, 1]", when=not 0 <= cfg.threshold <= 1)
        adjustment = prior_adjustment(self.labeled_prior, cfg.tro)
        self.register_buffer("adjustment", adjustment, persistent=False)
        self.register_buffer("scale", transfer_scale(adjustment, cfg.transfer_a, cfg.transfer_b),
                             persistent=False)
        #: whether the student has trained (evaluation reads it from then on)
        self.register_buffer("student_trained", torch.tensor(False))
        #: the student's confident weak-view labels per class since the run's start
        self.register_buffer("student_selected", torch.zeros(num_classes))

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {STUDENT_HEAD: linear_head(feat_dim, num_classes)}  # official fc2, Xavier

    def student_active(self, step: int) -> bool:
        """Whether the student trains at ``step`` (official ``epoch > 10``, from epoch 0)."""
        return step // self.cfg.epoch_iters > self.cfg.warmup_epochs

    def eval_predictor(self, model: nn.Module):
        if not bool(self.student_trained):
            return self.eval_logits  # the teacher (official classify before epoch 11)
        head = model.heads[STUDENT_HEAD]
        return lambda output: head(output.features)

    def label_predictor(self, model: nn.Module):
        adjustment = self.adjustment
        return lambda output: output.logits.float() - adjustment  # official targets_u2

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        parts = super().per_class_diagnostics()
        parts["tras"] = {"transfer_scale": self.scale.clone(),
                         "adjustment": self.adjustment.clone(),
                         "student_selected": self.student_selected.clone()}
        return parts

    def teacher_targets(self, logits_w: Tensor, feats_w: Tensor, step: int
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """(mask, label, raw argmax) of the teacher's logit-adjusted weak-view prediction
        ``softmax(f(u_w) - a)`` (aligned and refined when configured). No gradient."""
        logits = logits_w.detach().float()
        linear = logits.argmax(dim=-1)
        probs = torch.softmax(logits - self.adjustment, dim=-1)  # official targets_u2
        probs = aligned_refined_probs(probs, feats_w, step, self.refiner, self.dist_align)
        mask, pseudo = fixmatch_mask(probs, self.cfg.threshold)
        return mask, pseudo, linear

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        probe_logs, (logits_x, feats_x), (logits_w, feats_w), (logits_s1, feats_s1), \
            (logits_s2, feats_s2) = self.forward_views(batch, state)

        # teacher: FixMatch on logit-adjusted pseudo-labels, both strong views
        loss_x = F.cross_entropy(logits_x.float(), batch.y_lb)
        with torch.no_grad():
            mask, pseudo, linear = self.teacher_targets(logits_w, feats_w, state.step)
        self.refiner.observe(pseudo)
        loss_u = two_view_ce(logits_s1, logits_s2, pseudo, mask)
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": mask, **probe_logs}

        if self.student_active(state.step):
            student_loss, student_logs = self._student_losses(
                state, batch, (feats_x, feats_w, feats_s1, feats_s2), (logits_s1, logits_s2))
            loss = loss + student_loss
            logs.update(student_logs)
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s1, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs

    def _student_losses(self, state: StepState, batch: Batch, feats: tuple,
                        teacher_strong: tuple) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logit-adjusted labeled loss and its transfer loss, and their logs."""
        cfg, head = self.cfg, state.model.heads[STUDENT_HEAD]
        sizes = [len(f) for f in feats]
        g_x, g_w, g_s1, g_s2 = head(torch.cat(feats)).float().split(sizes)
        loss_xs = adjusted_labeled_loss(g_x, batch.y_lb, self.adjustment)
        with torch.no_grad():
            conf, student_labels = hard_labels(torch.softmax(g_w.detach(), dim=-1))
            mask = conf.ge(cfg.threshold).float()  # official select_maskkd
            target = transferred_logits(torch.cat(teacher_strong).detach().float(),
                                        student_labels.repeat(2), self.adjustment, self.scale)
            self._count_selected(student_labels, mask)
            self.student_trained.fill_(True)
        loss_t = transfer_loss(torch.cat([g_s1, g_s2]), target, mask.repeat(2),
                               cfg.transfer_temperature)
        logs = {"loss/student_labeled": loss_xs.detach(), "loss/transfer": loss_t.detach(),
                "mask/student_ratio": mask.mean()}
        return loss_xs + loss_t, logs

    def _count_selected(self, labels: Tensor, mask: Tensor) -> None:
        """Add the student's confident labels per class (every process's batch)."""
        counts = (one_hot(labels, self.num_classes) * mask.unsqueeze(1)).sum(dim=0)
        self.student_selected.add_(all_gather_cat(counts.unsqueeze(0)).sum(dim=0))
