"""CCL: Continuous Contrastive Learning (Zhou et al., NeurIPS 2024, "Continuous Contrastive
Learning for Long-Tailed Semi-Supervised Recognition"), following the official ``train.py``,
``loss/semiConLoss.py`` and ``models/wideresnet.py`` (github.com/zhouzihao11/CCL).

A dual-branch network as ACR's (the network's classifier ``f`` and a balanced linear head
``g``, which evaluation reads: the official ``test`` reports ``test_acc_b``), plus two
projection heads (Linear-BN-ReLU-Linear to ``2 * feat_dim``, L2-normalised): ``projection``
on the features and ``center_projection`` on the rows of ``g``'s weight, the class centres.
``adj(pi, t) = log(pi ** t + 1e-12)`` (official ``compute_adjustment_by_py``), ``pi`` the
labeled class frequencies, ``pi_all`` and ``pi_u`` the estimated class distributions of all
and of the unlabeled data (below), ``rho = mu / (1 + mu)``:

* pseudo-label (paper Sec. 4.2, official ``logits_co``): ``z = 1/2 (f(u_w) - adj((1 - rho)
  pi + rho pi_all, 1) + adj(pi_u, 1 + tau / 2)) + 1/2 g(u_w)``, ``q = softmax(z / T)``,
  kept where ``max q >= t``;
* classification (official ``loss_cls``): ``CE(f(x), y) + CE(g(x) + adj(pi, tau), y)`` and,
  weighted ``w = max(1.5, mu)``, the masked CE of ``f`` and of ``g + adj(pi_all, tau)`` on
  both strong views towards ``argmax q``;
* smoothed contrastive loss (paper Eq. 12, official ``SemiConLoss``): each unlabeled view's
  class probabilities from a Gaussian-kernel density over the anchors (class centres, labeled
  contrastive views), propagated over the batch, ``(1 - alpha) (I - alpha S)^-1 P``; the
  weak view's, sharpened, is the target of both strong views', plus the entropy of their mean;
* reliable contrastive loss (paper Eq. 11, official ``softConLoss``): a class-balanced
  supervised contrastive loss over centres, labeled views and the strong views of the
  unlabeled images whose energy ``-logsumexp(z / T) <= e``, with the sharpened ``q`` as soft
  labels;
* total: ``lambda1 L_cls + lambda2 L_smoothed + (1 - lambda1) L_reliable``.

Estimates (paper Sec. 4.3, official ``num_all`` / ``num_unlabeled``): per epoch of
``epoch_iters`` steps the counts (starting at one per class) add the confident ``q``
(``pi_all``) and the low-energy ``q`` (``pi_u``); every ``update_every`` steps of an epoch
after ``estimate_after_epochs`` they move ``pi_all <- beta pi_all + (1 - beta) c / sum c``,
``pi_u <- alpha_u pi_u + (1 - alpha_u) c_u / sum c_u`` and restart. ``pi_all`` starts at
``pi``, ``pi_u`` uniform. All of it lives in buffers, so a checkpoint resumes exactly.

Differs from the official code (docs/experiments.md, "CCL", lists each difference):

* the labeled contrastive views are imbssl's strong view (RandAugment + Cutout), not the
  official SimCLR transform (random resized crop, colour jitter, grayscale, blur);
* the official unlabeled set contains the labeled images, whose ground truth is hidden as -2
  and kept out of ``pi_u``'s counts (``mask_l``); imbssl's unlabeled set is disjoint from the
  labeled one, so every unlabeled image counts;
* ``pi`` is the labeled set's class frequencies (official ``compute_py`` counts one pass of
  the shuffled labeled loader with ``drop_last``);
* logit adjustment (``algorithm.logit_adjust``) is refused: CCL adjusts its own logits.

With ``pseudo=daso`` the blended probabilities ``q`` are refined before the confidence, the
label, the contrastive soft labels and the counts; the final labels are observed and DASO's
alignment loss uses the first strong view.

Diagnostics: ``pseudo/linear`` is ``f``'s argmax on the weak view, ``pseudo/final`` the
(refined) ``argmax q`` and ``pseudo/mask`` its confidence mask; ``per_class.csv`` carries the
estimates ``prior_all`` and ``prior_unlabeled`` per class (kind ``ccl``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.abc import linear_head
from imbssl.algorithms.acr import logit_adjustment
from imbssl.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    StepState,
    refuse_logit_adjust,
    reject_setting,
)
from imbssl.collectives import all_reduce_sum
from imbssl.errors import UserError
from imbssl.pseudo.base import add_extra_loss, hard_labels

BALANCED_HEAD = "balanced"
PROJECTION_HEAD = "projection"
CENTER_HEAD = "center_projection"


@dataclass
class CCLConfig(AlgorithmConfig):
    name: str = "ccl"
    uratio: int = 1  # mu (official train.py --mu default 1; configs/*.sh keep it)
    threshold: float = 0.95  # confidence threshold t (official --threshold)
    temperature: float = 1.0  # T of the pseudo-label softmax and energy (official --T)
    tau_adjust: float = 2.0  # tau of the logit adjustments (official --tau)
    lambda_cls: float = 0.7  # lambda1; the reliable loss weighs 1 - lambda1 (official --lambda1)
    lambda_smoothed: float = 1.0  # lambda2, the smoothed loss (official --lambda2)
    unlabeled_weight_min: float = 1.5  # w = max(1.5, mu) (official train.py max(1.5, args.mu))
    sharpen_power: float = 4.0  # contrastive targets p^4 / sum p^4 (official sharp(., 4.0))
    energy_cutoff: float = -8.75  # reliable views: energy <= e (official energy.le(-8.75))
    contrast_temperature: float = 0.1  # Gaussian-kernel temperature (official temperature 0.1, / 0.1)
    propagation_alpha: float = 0.2  # label propagation alpha (official unlabelProbability alpha)
    estimate_unlabeled_momentum: float = 0.5  # alpha of pi_u's EMA (official --alpha)
    estimate_all_momentum: float = 0.5  # beta of pi_all's EMA (official --beta)
    epoch_iters: int = 500  # steps per epoch (official --eval-step)
    estimate_after_epochs: int = 5  # estimates move after this epoch (official --est-epoch)
    update_every: int = 500  # steps of an epoch between estimate updates (official --upbatch)


def projection_head(feat_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear (official ``head`` / ``head_fc``), Xavier-normal weights and zero
    biases (official ``WideResNetCon.__init__`` initialises every ``nn.Linear`` so)."""
    head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.BatchNorm1d(feat_dim),
                         nn.ReLU(inplace=True), nn.Linear(feat_dim, out_dim))
    for layer in (head[0], head[3]):
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
    return head


def sharpen(probs: Tensor, power: float) -> Tensor:
    """``p ** power / sum p ** power`` per row, detached (official ``sharp``)."""
    probs = probs ** power
    return (probs / probs.sum(dim=1, keepdim=True)).detach()


def soft_entropy(target: Tensor, pred: Tensor) -> Tensor:
    """``-1/N sum_i sum_k target_ik log pred_ik`` (official ``crossLoss``)."""
    return -torch.mean(torch.sum(target * torch.log(pred), dim=1), dim=0)


def propagated_probabilities(anchor_feats: Tensor, anchor_labels: Tensor, feats: Tensor,
                             alpha: float, temperature: float) -> Tensor:
    """Class probabilities of ``feats`` (paper Eqs. 9-10, official ``unlabelProbability``):
    ``P = softmax_k log(sum_j exp(z . a_j / temp) y_jk / sum_j y_jk)`` (the class-mean Gaussian
    kernel over the anchors), propagated over the batch: ``(1 - alpha) (I - alpha S)^-1 P``
    with ``S = softmax(z z^T)`` row-wise."""
    similarity = torch.softmax(feats @ feats.t(), dim=1)
    eye = torch.eye(len(feats), device=feats.device, dtype=feats.dtype)
    propagate = torch.inverse(eye - alpha * similarity)
    kernel = torch.exp(feats @ anchor_feats.t() / temperature)
    density = (kernel @ anchor_labels) / anchor_labels.sum(dim=0)
    return propagate @ ((1 - alpha) * torch.softmax(torch.log(density), dim=1))


def smoothed_contrastive_loss(anchor_feats: Tensor, anchor_labels: Tensor, weak: Tensor,
                              strong1: Tensor, strong2: Tensor, alpha: float,
                              temperature: float, power: float) -> Tensor:
    """``1/3 (H(q_w, q_1) + H(q_w, q_2) + H(q_bar, q_bar))`` with ``q_w`` the weak view's
    sharpened propagated probabilities (no gradient), ``q_1, q_2`` the strong views' and
    ``q_bar`` their mean (paper Eq. 12, official ``SemiConLoss.forward``)."""
    with torch.no_grad():
        target = sharpen(propagated_probabilities(anchor_feats, anchor_labels, weak, alpha,
                                                  temperature), power)
    q1 = propagated_probabilities(anchor_feats, anchor_labels, strong1, alpha, temperature)
    q2 = propagated_probabilities(anchor_feats, anchor_labels, strong2, alpha, temperature)
    mean = (q1 + q2) / 2
    return (soft_entropy(target, q1) + soft_entropy(target, q2) + soft_entropy(mean, mean)) / 3


def reliable_contrastive_loss(feats: Tensor, labels: Tensor, num_centers: int,
                              temperature: float) -> Tensor:
    """Class-balanced supervised contrastive loss with soft labels (paper Eq. 11, official
    ``softConLoss.forward``): for each row i past the ``num_centers`` centres,
    ``l_ik = log(sum_{j != i} exp(z_i . z_j / temp) y_jk / (sum_j y_jk - y_ik))`` and the loss
    is the soft-label cross-entropy ``-1/N sum_i sum_k y_ik log softmax(l_i)_k``."""
    kernel = torch.exp(feats @ feats.t() / temperature)
    kernel = kernel * (1 - torch.eye(len(feats), device=feats.device, dtype=feats.dtype))
    class_sizes = labels.sum(dim=0, keepdim=True) - labels
    logits = torch.log((kernel @ labels) / class_sizes)[num_centers:]
    return F.cross_entropy(logits, labels[num_centers:])


def blended_logits(logits_weak: Tensor, balanced_weak: Tensor, prior: Tensor, prior_all: Tensor,
                   prior_unlabeled: Tensor, tau: float, rho: float) -> Tensor:
    """``1/2 (f - adj((1 - rho) pi + rho pi_all, 1) + adj(pi_u, 1 + tau/2)) + 1/2 g``
    (official ``logits_co`` with ``logits_la_u``)."""
    adjust = (-logit_adjustment((1 - rho) * prior + rho * prior_all, 1.0)
              + logit_adjustment(prior_unlabeled, 1 + tau / 2))
    return 0.5 * (logits_weak + adjust) + 0.5 * balanced_weak


def masked_two_view_ce(logits1: Tensor, logits2: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over both strong views of the masked CE (official ``cat`` of the two views)."""
    ce = torch.cat([F.cross_entropy(logits1, targets, reduction="none"),
                    F.cross_entropy(logits2, targets, reduction="none")])
    return (ce * torch.cat([mask, mask])).mean()


@register("ccl")
class CCL(Algorithm):
    """Dual-branch FixMatch with estimated priors and reliable + smoothed contrastive losses."""

    Config = CCLConfig
    unlabeled_views = ("weak", "strong", "strong")
    #: the two labeled contrastive views (official Transform_Con_Labeled: weak + 2 SimCLR views)
    labeled_views = ("strong", "strong")

    def __init__(self, cfg: CCLConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        refuse_logit_adjust(cfg, "ccl", "adjusts its logits itself (estimated priors)")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        for key in ("estimate_unlabeled_momentum", "estimate_all_momentum"):
            reject_setting(cfg, key, "in [0, 1]", when=not 0 <= getattr(cfg, key) <= 1)
        for key in ("epoch_iters", "update_every"):
            reject_setting(cfg, key, ">= 1", when=getattr(cfg, key) < 1)
        for key in ("temperature", "contrast_temperature"):
            reject_setting(cfg, key, "> 0", when=getattr(cfg, key) <= 0)
        reject_setting(cfg, "propagation_alpha", "in [0, 1)",
                       when=not 0 <= cfg.propagation_alpha < 1)
        reject_setting(cfg, "estimate_after_epochs", ">= 0", when=cfg.estimate_after_epochs < 0)
        reject_setting(cfg, "lambda_cls", "in [0, 1] (the reliable loss weighs 1 - lambda_cls)",
                       when=not 0 <= cfg.lambda_cls <= 1)
        reject_setting(cfg, "update_every", f"<= algorithm.epoch_iters ({cfg.epoch_iters}), "
                       "else the estimates never move", when=cfg.update_every > cfg.epoch_iters)
        if bool((self.labeled_prior == 0).any()):
            raise ValueError("CCL needs at least one labeled image of every class "
                             "(its contrastive class densities divide by the class counts)")
        #: pi_all, the estimate over all data (official args.py_all = py_con at first)
        self.register_buffer("prior_all", self.labeled_prior.clone())
        #: pi_u, the estimate of the unlabeled data (official args.py_uni, uniform at first)
        self.register_buffer("prior_unlabeled", torch.full((num_classes,), 1.0 / num_classes))
        #: this window's counts (official num_all / num_unlabeled, ones at every restart)
        self.register_buffer("count_all", torch.ones(num_classes))
        self.register_buffer("count_unlabeled", torch.ones(num_classes))

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        # official WideResNetCon: fc1 (balanced), head and head_fc to 2 * channels
        return {BALANCED_HEAD: linear_head(feat_dim, num_classes),
                PROJECTION_HEAD: projection_head(feat_dim, 2 * feat_dim),
                CENTER_HEAD: projection_head(feat_dim, 2 * feat_dim)}

    def eval_predictor(self, model: nn.Module):
        head = model.heads[BALANCED_HEAD]
        return lambda output: head(output.features)

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        parts = super().per_class_diagnostics()
        parts["ccl"] = {"prior_all": self.prior_all, "prior_unlabeled": self.prior_unlabeled}
        return parts

    # ------------------------------------------------------------------ estimates
    @torch.no_grad()
    def start_window(self, step: int) -> None:
        """At an epoch's first step the counts restart (official: ones at every epoch)."""
        if step % self.cfg.epoch_iters == 0:
            self.count_all.fill_(1.0)
            self.count_unlabeled.fill_(1.0)

    @torch.no_grad()
    def update_estimates(self, probs: Tensor, confident: Tensor, low_energy: Tensor,
                         step: int) -> None:
        """Add the confident (``pi_all``) and low-energy (``pi_u``) probabilities to the counts
        (every process's); after every ``update_every``-th step of an estimating epoch, move the
        estimates towards the normalised counts and restart them (official train loop)."""
        cfg = self.cfg
        self.count_all.add_(all_reduce_sum((probs * confident[:, None]).sum(dim=0)))
        self.count_unlabeled.add_(all_reduce_sum((probs * low_energy[:, None]).sum(dim=0)))
        epoch, index = divmod(step, cfg.epoch_iters)
        if (index + 1) % cfg.update_every != 0 or epoch <= cfg.estimate_after_epochs:
            return
        a, b = cfg.estimate_unlabeled_momentum, cfg.estimate_all_momentum
        self.prior_unlabeled.mul_(a).add_((1 - a) * self.count_unlabeled / self.count_unlabeled.sum())
        self.prior_all.mul_(b).add_((1 - b) * self.count_all / self.count_all.sum())
        self.count_all.fill_(1.0)
        self.count_unlabeled.fill_(1.0)

    # ------------------------------------------------------------------ the step
    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, model = self.cfg, state.model
        if len(batch.x_lb_views) != 2:
            raise UserError("algorithm=ccl needs the two labeled contrastive views "
                            "(labeled_views); this input pipeline does not draw them")
        self.start_window(state.step)
        self.feed_refiner(batch, state)
        x_w, u_w, u_s1, u_s2 = batch.x_lb, *batch.x_ulb
        x_s1, x_s2 = batch.x_lb_views
        # one forward, official order: x, u_w, u_s, u_s1, x_s, x_s1 (batch-norm sees them all)
        out = model(torch.cat([x_w, u_w, u_s1, u_s2, x_s1, x_s2]))
        nl, nu = len(x_w), len(u_w)
        sizes = [nl, nu, nu, nu, nl, nl]
        cls_rows = nl + 3 * nu  # the classifiers see the weak labeled and the unlabeled views
        logits_x, logits_w, logits_s1, logits_s2 = out.logits[:cls_rows].float().split(sizes[:4])
        bal_x, bal_w, bal_s1, bal_s2 = model.heads[BALANCED_HEAD](
            out.features[:cls_rows]).float().split(sizes[:4])
        feats_w, feats_s1 = out.features.split(sizes)[1:3]

        cls_loss, targets, logs = self._classification(batch, state, logits_x, logits_w,
                                                       logits_s1, logits_s2, bal_x, bal_w,
                                                       bal_s1, bal_s2, feats_w)
        smoothed, reliable, contrast_logs = self._contrastive(model, out.features, sizes,
                                                              batch.y_lb, *targets)
        loss = (cfg.lambda_cls * cls_loss + cfg.lambda_smoothed * smoothed
                + (1 - cfg.lambda_cls) * reliable)
        logs.update({"loss/classification": cls_loss.detach(), **contrast_logs})
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s1, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs

    def _classification(self, batch, state, logits_x, logits_w, logits_s1, logits_s2, bal_x,
                        bal_w, bal_s1, bal_s2, feats_w):
        """Both heads' labeled and masked unlabeled losses, the pseudo-label and the estimates;
        returns (loss, (contrastive soft labels, low-energy mask), logs)."""
        cfg, prior = self.cfg, self.labeled_prior
        mu = len(logits_w) / len(logits_x)
        loss_x = F.cross_entropy(logits_x, batch.y_lb)
        loss_xb = F.cross_entropy(bal_x + logit_adjustment(prior, cfg.tau_adjust), batch.y_lb)
        adjust_all = logit_adjustment(self.prior_all, cfg.tau_adjust)  # before this step's update
        with torch.no_grad():
            z = blended_logits(logits_w.detach(), bal_w.detach(), prior, self.prior_all,
                               self.prior_unlabeled, cfg.tau_adjust, mu / (1 + mu)) / cfg.temperature
            energy = -torch.logsumexp(z, dim=1)
            probs = self.refiner.refine(torch.softmax(z, dim=1), feats_w.detach(), state.step)
            conf, pseudo = hard_labels(probs)
            mask = conf.ge(cfg.threshold).float()
            low_energy = energy.le(cfg.energy_cutoff).float()
            self.update_estimates(probs, mask, low_energy, state.step)
        self.refiner.observe(pseudo)
        weight = max(cfg.unlabeled_weight_min, float(cfg.uratio))
        loss_u = masked_two_view_ce(logits_s1, logits_s2, pseudo, mask)
        loss_ub = masked_two_view_ce(bal_s1 + adjust_all, bal_s2 + adjust_all, pseudo, mask)
        loss = weight * loss_u + loss_x + weight * loss_ub + loss_xb  # official loss_u + loss_b
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "loss/balanced_labeled": loss_xb.detach(),
                "loss/balanced_unlabeled": loss_ub.detach(), "mask/ratio": mask.mean(),
                "mask/low_energy": low_energy.mean(),
                "pseudo/linear": logits_w.detach().argmax(dim=-1), "pseudo/final": pseudo,
                "pseudo/mask": mask}
        return loss, (sharpen(probs, cfg.sharpen_power), low_energy.bool()), logs

    def _contrastive(self, model, features, sizes, y_lb, soft_labels, low_energy):
        """The smoothed and the reliable contrastive losses on the projections (float32)."""
        cfg, k = self.cfg, self.num_classes
        proj = model.heads[PROJECTION_HEAD](features)  # BN over every view, as official
        centers = model.heads[CENTER_HEAD](model.heads[BALANCED_HEAD].weight)
        with torch.autocast(features.device.type, enabled=False):
            proj = F.normalize(proj.float(), dim=1)
            centers = F.normalize(centers.float(), dim=1)
            _, z_w, z_s1, z_s2, z_x1, z_x2 = proj.split(sizes)
            one_hot = F.one_hot(y_lb, k).float()
            # the centres count towards every class (official center_label = ones(K, K))
            anchor_labels = torch.cat([torch.ones(k, k, device=proj.device), one_hot, one_hot])
            anchors = torch.cat([centers, z_x1, z_x2])
            smoothed = smoothed_contrastive_loss(anchors, anchor_labels, z_w, z_s1, z_s2,
                                                 cfg.propagation_alpha, cfg.contrast_temperature,
                                                 cfg.sharpen_power)
            chosen = soft_labels[low_energy].float()
            reliable = reliable_contrastive_loss(
                torch.cat([anchors, z_s1[low_energy], z_s2[low_energy]]),
                torch.cat([anchor_labels, chosen, chosen]), k, cfg.contrast_temperature)
        return smoothed, reliable, {"loss/smoothed_contrastive": smoothed.detach(),
                                    "loss/reliable_contrastive": reliable.detach()}
