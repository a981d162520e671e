"""The algorithm contract: one training step's losses from a batch and the trainer's state.

An algorithm computes ``loss, logs = algo.step(batch, state)``. The trainer alone owns the
optimizer, precision, EMA, schedule, logging and checkpoints, and never looks at which
algorithm it runs. An algorithm is an ``nn.Module`` so that its own state (running means,
memory banks, DASO queues) lives in buffers that move with ``.to(device)`` and are saved by
``state_dict()``; the network is *not* a submodule of the algorithm, it arrives in ``state``.

Logs: a dict of tensors, never Python floats (no host sync per step).
  * 0-d tensors are scalars averaged over the log interval (``loss/...``, ``mask/...``).
  * keys under ``pseudo/`` are 1-d tensors with one entry per unlabeled image of the batch,
    in the order of ``batch.x_ulb[0]``: ``pseudo/linear`` (argmax of the classifier's
    prediction on the weak view), ``pseudo/semantic`` and ``pseudo/final`` where present,
    and ``pseudo/mask`` (1.0 where the pseudo-label is used by the unlabeled loss).
    The trainer pairs them with the true labels (which algorithms never see) for diagnostics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass
class AlgorithmConfig:
    """Fields every algorithm has; each algorithm extends it with its paper's defaults."""

    name: str = "supervised"
    uratio: int = 2  # mu: unlabeled images per labeled image (DASO's protocol: 2)


@dataclass
class Batch:
    """Augmented, normalised images on the training device.

    ``x_ulb[i]`` is the unlabeled batch under the i-th view of ``algo.unlabeled_views``
    (the same images in the same order in every view).
    """

    x_lb: Tensor
    y_lb: Tensor
    idx_lb: Tensor
    x_ulb: list[Tensor] = field(default_factory=list)
    idx_ulb: Tensor | None = None


@dataclass
class StepState:
    """What the trainer lends an algorithm for one step."""

    step: int
    total_steps: int
    model: nn.Module
    ema_model: nn.Module


class Algorithm(nn.Module):
    """Base class: subclasses set ``Config``, the views they need, and implement ``step``."""

    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    #: augmentations of the unlabeled batch the step needs, e.g. ("weak", "strong")
    unlabeled_views: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: AlgorithmConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner: nn.Module | None = None):
        super().__init__()
        from imbssl.pseudo import IdentityRefiner

        self.cfg = cfg
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.num_labeled = len(labeled_labels)
        counts = torch.bincount(labeled_labels.long().cpu(), minlength=num_classes).float()
        #: p(y) of the labeled set (the target of distribution alignment)
        self.register_buffer("labeled_prior", counts / counts.sum().clamp_min(1.0),
                             persistent=False)
        self.refiner = refiner if refiner is not None else IdentityRefiner()
        if not self.unlabeled_views and type(self.refiner) is not IdentityRefiner:
            from imbssl.errors import UserError

            raise UserError(f"algorithm={cfg.name} trains on labeled data only, so a "
                            "pseudo-label refiner does not apply; add pseudo=none")

    @classmethod
    def make_heads(cls, cfg: AlgorithmConfig, feat_dim: int,
                   num_classes: int) -> dict[str, nn.Module]:
        """Extra heads the network needs (a rotation classifier, a projection head)."""
        return {}

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def eval_logits(self, output) -> Tensor:
        """The logits evaluation takes the argmax of, from the network's output: the
        classifier's by default; a method may read another head or adjust them post hoc."""
        return output.logits

    def eval_predictor(self, model: nn.Module):
        """``output -> logits`` that evaluation argmaxes for ``model``, the network evaluated
        (its heads included): ``eval_logits`` by default; a method that predicts with one of
        ``model.heads`` (ABC's balanced classifier) returns a function reading that head."""
        return self.eval_logits

    def feed_refiner(self, batch: Batch, state: StepState,
                     ema_features: Tensor | None = None) -> None:
        """Give the refiner the EMA model's features of the labeled batch (DASO's queues);
        pass ``ema_features`` when the algorithm has computed them already."""
        if self.refiner.needs_labeled_features:
            if ema_features is None:
                with torch.no_grad():
                    ema_features = state.ema_model(batch.x_lb).features
            self.refiner.update_labeled(ema_features.float(), batch.y_lb)

    def probe_ctaugment(self, batch: Batch, state: StepState) -> dict[str, Tensor]:
        """With CTAugment (``self.ctaugment``): score labeled probes with the EMA model (one
        no-grad forward of the labeled batch, official FixMatch/ReMixMatch ``classify_op``)
        and update the bin weights; returns its log."""
        cta = getattr(self, "ctaugment", None)
        if cta is None:
            return {}
        return {"ctaugment/proximity": cta.probe_step(state.ema_model, batch.x_lb, batch.y_lb)}


def forward_all(model: nn.Module, *xs: Tensor):
    """One forward pass over the concatenation of ``xs`` (batch-norm sees them together);
    returns a (logits, features) pair per input, in order."""
    out = model(torch.cat(xs))
    sizes = [len(x) for x in xs]
    return list(zip(out.logits.split(sizes), out.features.split(sizes), strict=True))
