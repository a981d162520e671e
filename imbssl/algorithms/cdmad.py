"""CDMAD: class-distribution-mismatch-aware debiasing (Lee and Kim, CVPR 2024,
"CDMAD: Class-Distribution-Mismatch-Aware Debiasing for Class-Imbalanced Semi-Supervised
Learning"), FixMatch variant, following the official ``fixmatchcdmad.py`` of
github.com/LeeHyuck/CDMAD (commit 7cd732b), and ReMixMatch variant (``remixmatchcdmad.py``,
below).

The classifier's bias towards each class is measured as its logits on an image without any
pattern (a solid-colour image, official ``white = torch.ones((1, 3, 32, 32))`` in the
network's normalised input space):

* bias (paper Sec. 3, official ``biaseddegree, _ = model(white)``): ``g = f(x_solid)``,
  measured at every step with the training network (train mode, the solid image alone in its
  batch, before the step's forward) and at every evaluation with the evaluated network (eval
  mode, official ``validate``);
* refined pseudo-labels (official ``outputs_u = outputs_u - biaseddegree`` once
  ``epoch > --debiasstart``): ``q = softmax(f(alpha(u)) - g)``; the strong views are trained
  towards ``q`` (soft targets, official ``all_targets = cat([targets_x2, targets_u2,
  targets_u2])``) where ``max q >= tau`` (official ``--tau 0``: every image);
* refined evaluation (official ``validate``: ``outputs2 = outputs - biaseddegree``): the
  evaluated prediction is ``argmax_k f_k(x) - g_k`` (``eval_predictor``); the bias is measured
  once per evaluation, at its first batch, with the evaluated network in eval mode.

Why an algorithm and not a refiner: the bias needs a forward pass of the network on an image
that is not in the batch, at training and at evaluation, and CDMAD changes the evaluated
prediction; a refiner sees neither the network nor the evaluation. The test-time debiasing is
the ``eval_predictor`` role of the algorithm contract (no new hook); ``label_predictor`` keeps
the raw logits.

The official loop differs from FixMatch in ways the config keeps (each can be switched back):
two strong views (``strong_views``), soft targets (``soft_targets``), no confidence threshold
(``min_confidence``) and a delayed start of the training-time debiasing (``debias_after_epochs``).
Differences from the official code: one forward pass over the labeled, weak and strong images
(batch norm sees them together; official: one forward per group), cross-entropy on log-softmax
(official ``log(softmax + 1e-8)``).

With ``pseudo=daso`` (and distribution alignment) the debiased probabilities are refined before
the mask and the targets; DASO's semantic loss uses the first strong view.

ReMixMatch variant (``algorithm.base=remixmatch``, official ``remixmatchcdmad.py``; the registry
builds ``ReMixMatchCDMAD``, a ReMixMatch, through ``cdmad_learner``, as CReST builds its
ReMixMatch learner). Per step, in the official order: ``g = f(x_solid)`` (train mode, first),
the weak view's ``softmax(f(alpha(u)) - g)`` once debiasing (``ReMixMatch.guess_probs``),
distribution alignment to the labeled distribution over this epoch's last <= 128 batch means
(official ``emp_distb_u`` restarts every epoch), no sharpening (official ``--T 1``), the refiner;
MixUp of [strong labeled view, weak, strong 1, strong 2] (``ReMixMatch.mixup_labeled_images``)
and the loss ``Lx1 + Lx2 + w(t) (lambda_u Lu + lambda_kl Le) + lambda_rot Lr`` with ``Lx2`` the
unmixed cross-entropy of the weak labeled view, ``Le`` the pre-MixUp loss and ``Lr`` the
rotation loss of strong view 1, ``w(t)`` linear over the whole run (official ``--rampup 300`` of
``--epochs 300``). The evaluation is debiased as the FixMatch variant's. Set ``lambda_u`` 2.0
(official ``--lambda-u 2``) and ``dist_align`` labeled (official: where gamma_l = gamma_u) for
the official values: the two keys are shared with the FixMatch variant, whose defaults they keep.
Differences from the official code: one forward over the whole mixed batch (official: seven
interleaved batches of 64), the weak labeled forward after the rotation forward (official:
before), cross-entropy on log-softmax (official ``log(softmax + 1e-8)``), the alignment target
normalised before its 1e-6 (official: the counts; at most 1e-6 / p(y_k) relative).

Diagnostics: ``pseudo/linear`` is the argmax of the raw weak-view logits, ``pseudo/final`` the
argmax of the debiased (and refined) ones, ``pseudo/mask`` the selection; ``cdmad/debiasing`` is
1 once the pseudo-labels are debiased; per class (per_class.csv, kind ``cdmad``) the last
measured training bias ``g_k`` and its offset from the mean ``g_k - mean(g)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from imbssl.algorithms import register
from imbssl.algorithms.base import (
    AlgorithmConfig,
    Batch,
    StepState,
    fill_null_fields,
    reject_setting,
)
from imbssl.algorithms.fixmatch import FixMatch, fixmatch_mask
from imbssl.algorithms.ops import one_hot, soft_cross_entropy
from imbssl.algorithms.remixmatch import ReMixMatch
from imbssl.data.ctaugment import with_ctaugment
from imbssl.errors import UserError
from imbssl.pseudo.base import add_extra_loss


@dataclass
class CDMADConfig(AlgorithmConfig):
    """Not FixMatch's config: its ``threshold`` must be in (0, 1], CDMAD's official tau is 0."""

    name: str = "cdmad"
    uratio: int = 2  # mu (official fixmatchcdmad.py --unlabeledratio 2)
    min_confidence: float = 0.0  # tau: q is used where max q >= tau (official --tau 0: all)
    lambda_u: float | None = None  # null: the base's (BASE_DEFAULTS)
    soft_targets: bool = True  # official all_targets = softmax targets (hard p_hat commented out)
    strong_views: int = 2  # official TransformTwice: weak + two strong views, both trained
    epoch_iters: int = 500  # steps per epoch (official --val-iteration 500)
    debias_after_epochs: int = 100  # debiased when epoch > 100 (official --debiasstart); -1: always
    bias_image_value: float = 1.0  # the solid image (official torch.ones, normalised input)
    #: the weight of the training-time measurement's batch-norm running-statistic update,
    #: relative to one of the step's other forwards (1: a full update, 0: none); null: the
    #: official share (BASE_DEFAULTS). Officially ``model(white)`` is 1 of the step's 5
    #: (FixMatch) or 12 (ReMixMatch) train-mode forwards, each moving the statistics by the
    #: momentum; imbssl's step has fewer forwards (FixMatch: 1 joint batch), so a full update
    #: would give the solid image a larger share of the statistics evaluation reads.
    bias_bn_update_scale: float | None = None
    debias_eval: bool = True  # evaluate argmax f(x) - g (official validate: outputs - biaseddegree)
    dist_align: str | None = None  # none | labeled | uniform; null: the base's (BASE_DEFAULTS)
    dist_align_window: int = 128  # batches in p~(y) (ReMixMatch / DASO)
    strong_augment: str = "randaugment"  # randaugment | ctaugment (official: RandAugment)
    base: str = "fixmatch"  # fixmatch (official fixmatchcdmad.py) | remixmatch (remixmatchcdmad.py)
    # ReMixMatch variant only (base=remixmatch; official remixmatchcdmad.py)
    temperature: float = 1.0  # T (official --T 1: the sharpening lines are commented out)
    mixup_alpha: float = 0.75  # official --mix_alpha 0.75
    lambda_kl: float = 0.5  # pre-MixUp loss Le on strong view 1, ramped (official --w_ent 0.5)
    lambda_rot: float = 1.0  # rotation loss Lr (official --w_rot 1; 0.5 if |L|+|U| >= 30000)
    rampup_ratio: float = 1.0  # ramp of lambda_u, lambda_kl (official --rampup 300 = --epochs 300)
    passes: str = "official"  # ReMixMatch's forward passes (configs/algorithm/remixmatch.yaml)
    labeled_mixup_view: str = "strong"  # labeled view in MixUp (official inputs_x1 = inputsstrong)
    weak_labeled_loss: bool = True  # + CE of the unmixed weak labeled view (official Lx = Lx1 + Lx2)
    dist_align_epoch_reset: bool = True  # p~(y) restarts each epoch (official emp_distb_u)

    def __post_init__(self) -> None:
        """Null fields take the base's value; an unknown base is left to ``check_cdmad_config``."""
        fill_null_fields(self, BASE_DEFAULTS.get(self.base, {}))


def official_update_scale(official_others: int, imbssl_others: int) -> float:
    """The scale k that gives the solid image the official share of the batch-norm updates:
    officially 1 of ``official_others + 1`` equal updates a step, here its update weighted k
    beside ``imbssl_others`` full ones: ``k / (k + n) = 1 / (N + 1)``, ``k = n / N``."""
    return imbssl_others / official_others


#: The official value per base of the fields both variants share (a null in the config):
BASE_DEFAULTS = {
    # fixmatchcdmad.py: loss = Lx + Lu; no distribution alignment; the solid image's forward is
    # 1 of 5 (weak, labeled, strong, strong beside it), here 1 of 2 (the joint batch)
    "fixmatch": {"lambda_u": 1.0, "dist_align": "none",
                 "bias_bn_update_scale": official_update_scale(4, 1)},
    # remixmatchcdmad.py --lambda-u 2; alignment iff imb_ratio == imb_ratio_u (a row of another
    # unlabeled distribution sets dist_align=none, as the generated rows do); the solid image's
    # forward is 1 of 12 (weak, 7 interleaved mixed batches, weak labeled, rotated, strong 1),
    # here 1 of 6 (weak, mixed, strong 1, rotated, weak labeled: passes=official)
    "remixmatch": {"lambda_u": 2.0, "dist_align": "labeled",
                   "bias_bn_update_scale": official_update_scale(11, 5)},
}


def solid_image(shape: tuple[int, ...], value: float, device, dtype=torch.float32) -> Tensor:
    """A batch of one image without any pattern: every input value ``value`` (official
    ``torch.ones((1, 3, 32, 32))``)."""
    return torch.full((1, *shape), float(value), device=device, dtype=dtype)


@torch.no_grad()
def measure_bias(model: nn.Module, image: Tensor) -> Tensor:
    """g = f(x_solid): the network's logits on the solid image, (K,) float32 (official
    ``biaseddegree, _ = model(white)``, in whatever mode ``model`` is)."""
    return model(image).logits.float()[0]


@torch.no_grad()
def measure_bias_scaling_bn_update(model: nn.Module, image: Tensor, scale: float) -> Tensor:
    """``measure_bias`` whose batch-norm running-statistic update is scaled by ``scale``:
    ``r <- r + scale * (r' - r)`` with ``r'`` the statistic after the forward, i.e. the
    momentum ``m`` acts as ``scale * m`` (1: the forward's own update, 0: none, the solid image
    is not counted; the batch counter keeps its increment unless ``scale`` is 0)."""
    if scale == 1:
        return measure_bias(model, image)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    bias = measure_bias(model, image)
    for m, buffers in zip(norms, saved, strict=True):
        for b, old in zip(m.buffers(), buffers, strict=True):
            if b.is_floating_point():
                b.copy_(old + scale * (b - old))
            elif scale == 0:
                b.copy_(old)
    return bias


def debiased_logits(logits: Tensor, bias: Tensor) -> Tensor:
    """f(x) - g (CDMAD's refinement of the pseudo-labels and of the test predictions)."""
    return logits.float() - bias


def debiasing_due(step: int, epoch_iters: int, after_epochs: int) -> bool:
    """Whether the pseudo-labels of ``step`` are debiased: its epoch (from 0) is after
    ``after_epochs`` (official ``if epoch > args.debiasstart``)."""
    return step // epoch_iters > after_epochs


BASES = ("fixmatch", "remixmatch")
LABELED_MIXUP_VIEWS = ("strong", "weak")
#: FixMatch-variant settings that the ReMixMatch variant does not read, at their defaults
FIXMATCH_ONLY = {"min_confidence": 0.0, "soft_targets": True, "strong_views": 2}


def check_cdmad_config(cfg: CDMADConfig) -> None:
    """One-line errors for settings CDMAD cannot use (both bases)."""
    if getattr(cfg, "logit_adjust", "none") == "posthoc":
        raise UserError("algorithm=cdmad debiases its evaluation by the measured bias "
                        "itself; algorithm.logit_adjust=posthoc does not apply, set "
                        "algorithm.logit_adjust=none (or loss)")
    if cfg.base not in BASES:
        raise UserError(f"algorithm.base={cfg.base} is not available for CDMAD; use one of "
                        f"{BASES} (official fixmatchcdmad.py, remixmatchcdmad.py)")
    reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
    reject_setting(cfg, "debias_after_epochs", ">= -1", when=cfg.debias_after_epochs < -1)
    reject_setting(cfg, "bias_bn_update_scale", "in [0, 1]",
                   when=not 0 <= cfg.bias_bn_update_scale <= 1)


def check_remixmatch_config(cfg: CDMADConfig) -> None:
    """One-line errors for the ReMixMatch variant's settings."""
    changed = [k for k, v in FIXMATCH_ONLY.items() if getattr(cfg, k) != v]
    if changed:
        raise UserError(f"algorithm.{changed[0]} is a setting of CDMAD's FixMatch variant; "
                        "with algorithm.base=remixmatch the guess is the debiased, aligned "
                        "distribution of the weak view for both strong views: leave it at "
                        f"{str(FIXMATCH_ONLY[changed[0]]).lower()}")
    if cfg.labeled_mixup_view not in LABELED_MIXUP_VIEWS:
        raise UserError(f"algorithm.labeled_mixup_view={cfg.labeled_mixup_view} must be one "
                        f"of {LABELED_MIXUP_VIEWS}")
    reject_setting(cfg, "temperature", "> 0", when=not cfg.temperature > 0)
    reject_setting(cfg, "mixup_alpha", "> 0", when=not cfg.mixup_alpha > 0)
    reject_setting(cfg, "rampup_ratio", ">= 0", when=not cfg.rampup_ratio >= 0)


def cdmad_learner(cfg: CDMADConfig) -> type:
    """The class ``algorithm=cdmad`` trains with: CDMAD's debiasing on the learner
    ``cfg.base`` (FixMatch: ``CDMAD``; ReMixMatch: ``ReMixMatchCDMAD``)."""
    return ReMixMatchCDMAD if cfg.base == "remixmatch" else CDMAD


class SolidImageDebiasing:
    """CDMAD's measurement of the bias on a solid image and its debiased evaluation, mixed
    into the learner (FixMatch or ReMixMatch)."""

    def _init_debiasing(self, num_classes: int) -> None:
        #: (C, H, W) of the training images (the solid image's shape; zeros before a step)
        self.register_buffer("input_shape", torch.zeros(3, dtype=torch.long))
        #: the bias g measured at the last step (diagnostics; measured afresh each step)
        self.register_buffer("bias", torch.zeros(num_classes))
        self._shape: tuple[int, ...] | None = None  # input_shape on the host (read once)

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the solid image: the training images' (saved with the checkpoint)."""
        if self._shape is None:
            shape = tuple(int(s) for s in self.input_shape.tolist())
            if not all(shape):
                raise RuntimeError("algorithm=cdmad has not seen a training image yet: the "
                                   "shape of its solid image is unknown")
            self._shape = shape
        return self._shape

    def solid_image(self, device) -> Tensor:
        return solid_image(self.image_shape(), self.cfg.bias_image_value, device)

    def record_input_shape(self, images: Tensor) -> None:
        """Keep the training images' (C, H, W) at the first step (no host sync after it)."""
        if self._shape is None:
            self._shape = tuple(images.shape[1:])
            self.input_shape.copy_(torch.tensor(self._shape, dtype=torch.long))

    def measure_training_bias(self, model: nn.Module, images: Tensor) -> Tensor:
        """g of this step: the training network (train mode) on the solid image, alone in its
        batch, before the step's forwards (official ``biaseddegree, _ = model(white)``)."""
        self.record_input_shape(images)
        bias = measure_bias_scaling_bn_update(model, self.solid_image(images.device),
                                              self.cfg.bias_bn_update_scale)
        self.bias.copy_(bias)
        return bias

    def eval_predictor(self, model: nn.Module):
        """argmax f(x) - g with g measured on the evaluated network at the first batch (in
        eval mode, as official ``validate``), or the raw logits with ``debias_eval=false``."""
        if not self.cfg.debias_eval:
            return self.eval_logits
        measured: dict[str, Tensor] = {}

        def predict(output) -> Tensor:
            if "bias" not in measured:
                measured["bias"] = measure_bias(model, self.solid_image(output.logits.device))
            return debiased_logits(self.eval_logits(output), measured["bias"])

        return predict

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        parts = super().per_class_diagnostics()
        parts["cdmad"] = {"bias": self.bias.clone(), "bias_offset": self.bias - self.bias.mean()}
        return parts

    def debiasing(self, step: int) -> bool:
        return debiasing_due(step, self.cfg.epoch_iters, self.cfg.debias_after_epochs)

    def debiasing_log(self, step: int, like: Tensor) -> Tensor:
        """``cdmad/debiasing``: 1 once the pseudo-labels are debiased."""
        return like.new_tensor(float(self.debiasing(step)))


@register("cdmad", learner=cdmad_learner)
class CDMAD(SolidImageDebiasing, FixMatch):
    """FixMatch whose pseudo-labels and test predictions subtract the logits of a solid image
    (the class of ``algorithm=cdmad``; with ``base=remixmatch`` the registry builds
    ``ReMixMatchCDMAD``)."""

    Config = CDMADConfig
    unlabeled_views = ("weak", "strong", "strong")

    def __init__(self, cfg: CDMADConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        check_cdmad_config(cfg)
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "strong_views", ">= 1", when=cfg.strong_views < 1)
        reject_setting(cfg, "min_confidence", "in [0, 1]", when=not 0 <= cfg.min_confidence <= 1)
        self.unlabeled_views = with_ctaugment(("weak",) + ("strong",) * cfg.strong_views,
                                              self.ctaugment)
        self._init_debiasing(num_classes)

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int):
        """The heads of the learner ``cfg.base`` (ReMixMatch's rotation head)."""
        if cfg.base == "remixmatch":
            return ReMixMatchCDMAD.make_heads(cfg, feat_dim, num_classes)
        return super().make_heads(cfg, feat_dim, num_classes)

    @torch.no_grad()
    def pseudo_targets(self, logits_w: Tensor, feats_w: Tensor, bias: Tensor, step: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(targets, mask, hard pseudo-label, argmax of the raw logits) of the weak view:
        ``q = softmax(f(alpha(u)) - g)`` once debiasing (official ``outputs_u -
        biaseddegree``; the raw logits before), aligned and refined; the mask is
        ``max q >= tau``; the targets are ``q`` (``soft_targets``) or its one-hot argmax."""
        cfg = self.cfg
        raw = logits_w.detach().float()
        logits = debiased_logits(raw, bias) if self.debiasing(step) else raw
        probs, _ = self.weak_view_probs(logits, feats_w, step)
        mask, pseudo = fixmatch_mask(probs, cfg.min_confidence)  # 1(max q >= tau), argmax q
        targets = probs if cfg.soft_targets else one_hot(pseudo, self.num_classes)
        return targets, mask, pseudo, raw.argmax(dim=-1)

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        bias = self.measure_training_bias(state.model, batch.x_lb)  # g, train mode
        probe_logs, (logits_x, _), (logits_w, feats_w), *strong = self.forward_views(batch, state)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)
        targets, mask, pseudo, linear = self.pseudo_targets(logits_w, feats_w, bias, state.step)
        self.refiner.observe(pseudo)

        # l_u = 1/(n mu B) sum_views sum_b 1(max q_b >= tau) H(q_b, p_m(y | A_v(u_b)))
        loss_u = torch.cat([soft_cross_entropy(logits_s, targets) * mask
                            for logits_s, _ in strong]).mean()
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "cdmad/debiasing": self.debiasing_log(state.step, mask),
                "pseudo/linear": linear, "pseudo/final": pseudo, "pseudo/mask": mask,
                **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, strong[0][1], state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs


class ReMixMatchCDMAD(SolidImageDebiasing, ReMixMatch):
    """ReMixMatch whose guess and test predictions subtract the logits of a solid image
    (official ``remixmatchcdmad.py``): the class ``algorithm=cdmad`` trains with
    ``algorithm.base=remixmatch`` (see ``cdmad_learner``).

    Per step: g = f(x_solid) (train mode, first) -> the weak view's ``softmax(f(alpha(u)) -
    g)`` once debiasing -> distribution alignment over this epoch's batches -> sharpening (T 1:
    none) -> the refiner; MixUp of [strong labeled, weak, strong 1, strong 2] with [y, q, q, q];
    L = Lx1 + Lx2 + w(t) lambda_u Lu + w(t) lambda_kl Le + lambda_rot Lr (official ``loss``)."""

    Config = CDMADConfig
    registered_name = "cdmad"
    # official dataset/remix_cifar10.py: TransformTwice(weak, strong) -> weak, strong, strong;
    # labeled TransformDoub(strong, weak); strong = RandAugment(3, 4) first, + Cutout(16)
    unlabeled_views = ("weak", "strong", "strong")
    labeled_views = ("strong",)

    def __init__(self, cfg: CDMADConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        check_cdmad_config(cfg)
        check_remixmatch_config(cfg)
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        views = ("strong",) if cfg.labeled_mixup_view == "strong" else ()
        self.labeled_views = with_ctaugment(views, self.ctaugment)
        self._init_debiasing(num_classes)

    def guess_probs(self, logits_w: Tensor, state: StepState) -> tuple[Tensor, Tensor]:
        """``q = softmax(f(alpha(u)) - g)`` once debiasing (official ``outputs_u = outputs_u
        - biaseddegree`` when ``epoch > debiasstart``), the raw softmax before; the linear
        pseudo-label is the argmax of the raw logits."""
        raw = logits_w.detach().float()
        logits = debiased_logits(raw, self.bias) if self.debiasing(state.step) else raw
        return torch.softmax(logits, dim=-1), raw.argmax(dim=-1)

    def mixup_labeled_images(self, batch: Batch) -> Tensor:
        """The strong labeled view (official ``inputs_x1 = inputsstrong``), or the weak one
        with ``labeled_mixup_view=weak``."""
        return batch.x_lb_views[0] if self.cfg.labeled_mixup_view == "strong" else batch.x_lb

    def restart_alignment_window(self, step: int) -> None:
        """p~(y) averages this epoch's batches only (official: ``emp_distb_u`` restarts from the
        first batch of every epoch, since ``train`` never returns it to ``main``)."""
        if (self.dist_align is not None and self.cfg.dist_align_epoch_reset
                and step % self.cfg.epoch_iters == 0):
            self.dist_align.restart()

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        self.measure_training_bias(state.model, batch.x_lb)  # g, train mode, before all else
        self.restart_alignment_window(state.step)
        loss, logs = super().step(batch, state)
        if self.cfg.weak_labeled_loss:
            # Lx2 = H(y, p_m(y | x_weak)), unmixed (official ``logits_x2, _ = model(inputs_x2)``)
            loss_x2 = self.labeled_loss(state.model(batch.x_lb).logits, batch.y_lb)
            loss = loss + loss_x2
            logs["loss/labeled_weak"] = loss_x2.detach()
        logs["cdmad/debiasing"] = self.debiasing_log(state.step, loss)
        return loss, logs
