"""Features of a network that returns logits only: the input of its classifier layer.

DASO needs the penultimate features (those the classifier sees) of the online and the EMA
network. Most FixMatch code returns logits only; a forward pre-hook on the classifier
layer keeps its input without changing the network.
"""
from __future__ import annotations

from torch import Tensor, nn


class FeatureTap:
    """Keeps ``features``, the input of ``module`` (e.g. the final ``nn.Linear``) in its
    latest forward, gradient included.

    Safe when an EMA copy is deep-copied from the network after the tap is registered: the
    copy's forward does not overwrite ``features`` (the hook checks which module ran). Tap
    the EMA network separately: ``FeatureTap(ema_model.fc)``.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.features: Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        if module is self.module:  # not a deep copy of the module that carries this hook
            self.features = args[0]

    def remove(self) -> None:
        """Unregister the hook; ``features`` keeps its last value."""
        self._handle.remove()


__all__ = ["FeatureTap"]
