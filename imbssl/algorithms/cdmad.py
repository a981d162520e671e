"""CDMAD: class-distribution-mismatch-aware debiasing (Lee and Kim, CVPR 2024,
"CDMAD: Class-Distribution-Mismatch-Aware Debiasing for Class-Imbalanced Semi-Supervised
Learning"), FixMatch variant, following the official ``fixmatchcdmad.py`` of
github.com/LeeHyuck/CDMAD (commit 7cd732b).

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
from imbssl.algorithms.base import AlgorithmConfig, Batch, StepState, reject_setting
from imbssl.algorithms.fixmatch import FixMatch, fixmatch_mask
from imbssl.algorithms.ops import one_hot, soft_cross_entropy
from imbssl.data.ctaugment import with_ctaugment
from imbssl.errors import UserError
from imbssl.pseudo.base import add_extra_loss


@dataclass
class CDMADConfig(AlgorithmConfig):
    """Not FixMatch's config: its ``threshold`` must be in (0, 1], CDMAD's official tau is 0."""

    name: str = "cdmad"
    uratio: int = 2  # mu (official fixmatchcdmad.py --unlabeledratio 2)
    min_confidence: float = 0.0  # tau: q is used where max q >= tau (official --tau 0: all)
    lambda_u: float = 1.0  # (official loss = Lx + Lu)
    soft_targets: bool = True  # official all_targets = softmax targets (hard p_hat commented out)
    strong_views: int = 2  # official TransformTwice: weak + two strong views, both trained
    epoch_iters: int = 500  # steps per epoch (official --val-iteration 500)
    debias_after_epochs: int = 100  # debiased when epoch > 100 (official --debiasstart); -1: always
    bias_image_value: float = 1.0  # the solid image (official torch.ones, normalised input)
    #: whether the training-time measurement moves the batch-norm running statistics (official:
    #: yes, ``model(white)`` in train mode; its share of the updates is 1 of 2 forwards a step
    #: here, 1 of 5 in the official loop)
    bias_updates_bn_stats: bool = True
    debias_eval: bool = True  # evaluate argmax f(x) - g (official validate: outputs - biaseddegree)
    dist_align: str = "none"  # none | labeled | uniform (official CDMAD FixMatch: none)
    dist_align_window: int = 128  # batches in p~(y) (ReMixMatch / DASO)
    strong_augment: str = "randaugment"  # randaugment | ctaugment (official: RandAugment)


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
def measure_bias_keeping_bn_stats(model: nn.Module, image: Tensor) -> Tensor:
    """``measure_bias`` with every batch-norm running statistic restored afterwards (the
    solid image is not counted in them)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    bias = measure_bias(model, image)
    for m, buffers in zip(norms, saved, strict=True):
        for b, old in zip(m.buffers(), buffers, strict=True):
            b.copy_(old)
    return bias


def debiased_logits(logits: Tensor, bias: Tensor) -> Tensor:
    """f(x) - g (CDMAD's refinement of the pseudo-labels and of the test predictions)."""
    return logits.float() - bias


def debiasing_due(step: int, epoch_iters: int, after_epochs: int) -> bool:
    """Whether the pseudo-labels of ``step`` are debiased: its epoch (from 0) is after
    ``after_epochs`` (official ``if epoch > args.debiasstart``)."""
    return step // epoch_iters > after_epochs


@register("cdmad")
class CDMAD(FixMatch):
    """FixMatch whose pseudo-labels and test predictions subtract the logits of a solid image."""

    Config = CDMADConfig
    unlabeled_views = ("weak", "strong", "strong")

    def __init__(self, cfg: CDMADConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        if getattr(cfg, "logit_adjust", "none") == "posthoc":
            raise UserError("algorithm=cdmad debiases its evaluation by the measured bias "
                            "itself; algorithm.logit_adjust=posthoc does not apply, set "
                            "algorithm.logit_adjust=none (or loss)")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        reject_setting(cfg, "strong_views", ">= 1", when=cfg.strong_views < 1)
        reject_setting(cfg, "epoch_iters", ">= 1", when=cfg.epoch_iters < 1)
        reject_setting(cfg, "debias_after_epochs", ">= -1", when=cfg.debias_after_epochs < -1)
        reject_setting(cfg, "min_confidence", "in [0, 1]", when=not 0 <= cfg.min_confidence <= 1)
        self.unlabeled_views = with_ctaugment(("weak",) + ("strong",) * cfg.strong_views,
                                              self.ctaugment)
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
        self.record_input_shape(batch.x_lb)
        measure = measure_bias if cfg.bias_updates_bn_stats else measure_bias_keeping_bn_stats
        bias = measure(state.model, self.solid_image(batch.x_lb.device))  # g, train mode
        self.bias.copy_(bias)
        probe_logs, (logits_x, _), (logits_w, feats_w), *strong = self.forward_views(batch, state)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)
        targets, mask, pseudo, linear = self.pseudo_targets(logits_w, feats_w, bias, state.step)
        self.refiner.observe(pseudo)

        # l_u = 1/(n mu B) sum_views sum_b 1(max q_b >= tau) H(q_b, p_m(y | A_v(u_b)))
        loss_u = torch.cat([soft_cross_entropy(logits_s, targets) * mask
                            for logits_s, _ in strong]).mean()
        loss = loss_x + cfg.lambda_u * loss_u
        debiasing = mask.new_tensor(float(self.debiasing(state.step)))
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "mask/ratio": mask.mean(), "cdmad/debiasing": debiasing,
                "pseudo/linear": linear, "pseudo/final": pseudo, "pseudo/mask": mask,
                **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, strong[0][1], state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
