"""Exponential moving average of a network's weights, updated in place after each step.

Three choices, each a config switch (``model.*``):

* ``warmup``: decay ``min(1 - 1/(step+1), decay)`` at 0-based step ``step`` (official DASO
  ``lib/models/ema_model.py``), so early EMA weights track the model; off: constant decay.
* ``buffers``: ``"average"`` averages floating-point buffers (batch-norm running statistics)
  with the same decay (official DASO); ``"copy"`` copies them from the model (FixMatch ports).
* ``train_mode``: the EMA network stays in train mode, so its forward passes during training
  (the labeled batch that feeds DASO's queues or SimMatch's bank) use batch statistics and
  move its running statistics (official DASO); evaluation switches to eval mode and back
  (``imbssl.engine.evaluate.confusion_matrix``). Off: always in eval mode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

BUFFER_MODES = ("copy", "average")


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay used by the update after 0-based ``step``."""
    return min(1.0 - 1.0 / (step + 1), decay) if warmup else decay


class EMA:
    """Holds ``self.model``, an EMA copy of a network."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False,
                 buffers: str = "copy", train_mode: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ema buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.decay, self.warmup, self.buffers = decay, warmup, buffers
        self.model = copy.deepcopy(model).train(train_mode)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """ema = d * ema + (1 - d) * weights, d = ``ema_decay_at(step)`` (foreach, no host
        sync); buffers copied or averaged."""
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            if self.buffers == "average" and b_ema.is_floating_point():
                b_ema.lerp_(b, weight)
            else:
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
