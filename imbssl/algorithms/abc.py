"""ABC: Auxiliary Balanced Classifier (Lee et al., NeurIPS 2021) on FixMatch, following the
official DASO ``lib/algorithm/fm_abc.py`` / ``lib/models/abc_model.py`` (and, with DASO,
``lib/models/daso_model.py`` under ``ALGORITHM.ABC.APPLY``).

A second linear classifier (the head ``abc``) on the shared features is trained beside the
FixMatch classifier:

* labeled: cross-entropy masked by ``M ~ Bernoulli(N_min / N_y)`` per image, so every class
  is kept with the tail class's count in expectation (ABC Sec. 3.2, Eq. 2; official
  ``bal_param = class_count[-1] / class_count``);
* unlabeled: the head's own soft prediction on the weak view is the target of its strong
  view, masked by the confidence ``max p >= threshold`` and by ``Bernoulli(g[argmax p])``
  with the gradual parameter ``g = 1 - (e / E) (1 - N_min / N_k)`` (``e`` completed epochs of
  ``E``; ABC Sec. 3.3; official ``1 - (epoch / 500) * (1 - bal_param)``, 500 iterations an
  epoch);
* the FixMatch loss of the main classifier is unchanged; the total is the plain sum;
* evaluation argmaxes the ABC head (``abc_model.py``: ``forward`` with ``is_train=False``);
* logit adjustment (``algorithm.logit_adjust``) is refused (official ``fm_abc.py`` has none).

With ``pseudo=daso`` (official ``daso_model.py`` with ABC on): the semantic pseudo-label of
the shared weak features is blended into the main classifier's pseudo-label as in FixMatch +
DASO, and (``daso_pseudo_label``, official ``ABC.DASO_PSEUDO_LABEL = True``) into the ABC
head's soft target too, with the blend weight looked up at the ABC head's argmax and the same
``m_hat`` (the histogram of the *main* classifier's final pseudo-labels, the only ones
observed). The semantic alignment loss is attached to the shared features once.

Diagnostics: ``pseudo/linear`` is the main classifier's argmax on the weak view,
``pseudo/final`` the ABC head's (refined) pseudo-label and ``pseudo/mask`` its mask
(confidence x Bernoulli), so the per-class tables show what ABC keeps, class by class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Batch, StepState, refuse_logit_adjust, reject_setting
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig, fixmatch_mask
from imbssl.algorithms.ops import soft_cross_entropy
from imbssl.pseudo.base import add_extra_loss, hard_labels

ABC_HEAD = "abc"


@dataclass
class ABCConfig(FixMatchConfig):
    name: str = "abc"
    uratio: int = 2  # mu (DASO protocol, as FixMatch; fm_abc.py runs on DASO's FixMatch)
    threshold: float = 0.95  # tau, both classifiers (ABC paper Sec. 4; official CONFIDENCE_THRESHOLD)
    epoch_iters: int = 500  # iterations per epoch of the gradual schedule (fm_abc.py: 500)
    daso_pseudo_label: bool = True  # with pseudo=daso, blend the ABC head's target too (official ABC.DASO_PSEUDO_LABEL)


def linear_head(feat_dim: int, num_classes: int) -> nn.Linear:
    """Linear(feat_dim, K), Xavier-normal weights and zero bias (DASO's ``Classifier``)."""
    head = nn.Linear(feat_dim, num_classes)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def balance_parameter(labeled_counts: Tensor) -> Tensor:
    """Bernoulli keep probability per class, ``N_min / N_k`` (ABC Eq. 2; official
    ``class_count[-1] / class_count``, the last class being the tail of a long-tailed split)."""
    counts = labeled_counts.float()
    if bool((counts <= 0).any()):
        raise ValueError("ABC needs at least one labeled image of every class")
    return counts.min() / counts


def gradual_parameter(bal: Tensor, step: int, total_steps: int, epoch_iters: int) -> Tensor:
    """``1 - (e / E) (1 - bal)`` with ``e = step // epoch_iters`` completed epochs of
    ``E = total_steps / epoch_iters`` (official ``1 - (epoch / 500) * (1 - bal_param)``)."""
    progress = min((step // epoch_iters) * epoch_iters / max(total_steps, 1), 1.0)
    return 1.0 - progress * (1.0 - bal)


def bernoulli_mask(keep: Tensor, labels: Tensor) -> Tensor:
    """Float mask with ``P(mask_i = 1) = keep[labels_i]`` (torch's RNG on ``keep``'s device)."""
    return torch.bernoulli(keep[labels].float())


@register("abc")
class ABC(FixMatch):
    """FixMatch plus an auxiliary balanced classifier, which evaluation uses."""

    Config = ABCConfig

    def __init__(self, cfg: ABCConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        refuse_logit_adjust(cfg, "abc", "balances with its own classifier")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        counts = torch.bincount(labeled_labels.long().cpu(), minlength=num_classes)
        self.register_buffer("bal_param", balance_parameter(counts), persistent=False)

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {ABC_HEAD: linear_head(feat_dim, num_classes)}

    def eval_predictor(self, model: nn.Module):
        head = model.heads[ABC_HEAD]
        return lambda output: head(output.features)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        probe_logs, (logits_x, feats_x), (logits_w, feats_w), (logits_s, feats_s) = \
            self.forward_views(batch, state)
        abc_loss, abc_logs = self._abc_losses(state, batch, feats_x, feats_w, feats_s)

        # FixMatch on the main classifier (as imbssl/algorithms/fixmatch.py)
        loss_x = F.cross_entropy(logits_x.float(), batch.y_lb)
        with torch.no_grad():
            probs, linear = self.weak_view_probs(logits_w, feats_w, state.step)
            mask, pseudo = fixmatch_mask(probs, cfg.threshold)
        self.refiner.observe(pseudo)
        loss_u = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()

        loss = loss_x + cfg.lambda_u * loss_u + abc_loss  # official: sum of the loss dict
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, **abc_logs, **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs

    def _abc_losses(self, state: StepState, batch: Batch, feats_x: Tensor, feats_w: Tensor,
                    feats_s: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The ABC head's masked labeled loss and masked soft consistency loss, and its logs."""
        cfg, head = self.cfg, state.model.heads[ABC_HEAD]
        sizes = [len(feats_x), len(feats_w), len(feats_s)]
        abc_x, abc_w, abc_s = head(torch.cat([feats_x, feats_w, feats_s])).float().split(sizes)

        # L_cls = 1/B sum M(x_b) H(y_b, p_abc(x_b)), M ~ Bernoulli(N_min / N_y)  (ABC Eq. 2)
        mask_x = bernoulli_mask(self.bal_param, batch.y_lb)
        loss_x = (F.cross_entropy(abc_x, batch.y_lb, reduction="none") * mask_x).mean()

        with torch.no_grad():
            p_abc = torch.softmax(abc_w.detach(), dim=-1)  # soft target (fm_abc.py: p_abc)
            if cfg.daso_pseudo_label:
                p_abc = self.refiner.refine(p_abc, feats_w.detach(), state.step)
            conf, pseudo = hard_labels(p_abc)
            keep = gradual_parameter(self.bal_param, state.step, state.total_steps,
                                     cfg.epoch_iters)
            mask_u = conf.ge(cfg.threshold).float() * bernoulli_mask(keep, pseudo)
        # L_con = 1/(mu B) sum 1(max p >= tau) M(u_b) H(p_abc(alpha(u_b)), p_abc(A(u_b)))  (Eq. 4)
        loss_u = (soft_cross_entropy(abc_s, p_abc) * mask_u).mean()
        logs = {"loss/abc_labeled": loss_x.detach(), "loss/abc_unlabeled": loss_u.detach(),
                "mask/abc_labeled": mask_x.mean(), "mask/abc_ratio": mask_u.mean(),
                "pseudo/final": pseudo, "pseudo/mask": mask_u}
        return loss_x + loss_u, logs
