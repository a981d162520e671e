"""Supervised baseline: cross-entropy on the labeled batch only."""
from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, Batch, StepState


@register("supervised")
class Supervised(Algorithm):
    """Labeled cross-entropy; unlabeled data is ignored."""

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        logits = state.model(batch.x_lb).logits
        loss = F.cross_entropy(self.labeled_logits(logits).float(), batch.y_lb)  # (+LA)
        return loss, {"loss/labeled": loss.detach()}
