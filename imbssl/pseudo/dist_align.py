"""Distribution alignment (ReMixMatch Sec. 3.1): scale the unlabeled predictions by
p(y) / p~(y) and renormalise, where p~(y) is the running mean of the model's predictions on
unlabeled data over the last ``window`` batches (128 in ReMixMatch and DASO).

As in DASO's ``lib/models/dist_align.py`` (and USB's ``DistAlignQueueHook``), the current
batch's mean prediction enters the running mean *before* it is used to align that batch.
All state lives in buffers (saved by ``state_dict`` for resume); no host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from imbssl.collectives import all_reduce_mean
from imbssl.pseudo.base import PerClassDiagnostics

TARGETS = ("labeled", "uniform")


class DistAlign(PerClassDiagnostics, nn.Module):
    """p_aligned = Normalize(p * target / running_mean(p)); target = labeled p(y) or uniform."""

    diagnostics_kind = "dist_align"

    def __init__(self, num_classes: int, target: str = "labeled", window: int = 128,
                 labeled_prior: Tensor | None = None, eps: float = 1e-6):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"distribution alignment target must be one of {TARGETS}, got {target!r}")
        if target == "labeled" and labeled_prior is None:
            raise ValueError("target='labeled' needs labeled_prior (the labeled class frequencies)")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        prior = (torch.full((num_classes,), 1.0 / num_classes) if target == "uniform"
                 else labeled_prior.detach().float().reshape(num_classes))
        self.window, self.eps = window, eps
        # derived from the labeled set / config, so not part of the checkpoint
        self.register_buffer("target", prior / prior.sum(), persistent=False)
        self.register_buffer("history", torch.zeros(window, num_classes))  # batch-mean ring buffer
        self.register_buffer("count", torch.zeros((), dtype=torch.long))    # updates so far

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Push the batch-mean prediction into the ring buffer."""
        slot = (self.count % self.window).view(1)
        # several processes: the mean over the global batch (equal shares per process)
        mean = all_reduce_mean(probs.detach().float().mean(0, keepdim=True))
        self.history.index_copy_(0, slot, mean)
        self.count += 1

    @torch.no_grad()
    def restart(self) -> None:
        """Empty the window: p~(y) is the mean of the batches pushed from now on."""
        self.history.zero_()
        self.count.zero_()

    def running_mean(self) -> Tensor:
        """Mean of the filled slots (p~(y))."""
        filled = self.count.clamp(min=1, max=self.window).to(self.history.dtype)
        return self.history.sum(0) / filled

    def per_class_diagnostics(self) -> dict[str, Tensor]:
        """The alignment target p(y) and the running mean p~(y) it divides by."""
        return {"target": self.target, "running_mean": self.running_mean()}

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        self.update(probs)
        aligned = probs.float() * (self.target + self.eps) / (self.running_mean() + self.eps)
        return aligned / aligned.sum(dim=-1, keepdim=True)


def build_dist_align(mode: str, num_classes: int, labeled_prior: Tensor,
                     window: int = 128) -> DistAlign | None:
    """``mode`` = "none" (no alignment), "labeled" (target p(y) of the labeled set) or "uniform"."""
    if mode == "none":
        return None
    return DistAlign(num_classes, target=mode, window=window, labeled_prior=labeled_prior)
