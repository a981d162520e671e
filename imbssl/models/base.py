"""The network every algorithm trains: a backbone returning (logits, features), plus optional
named heads (a rotation classifier, a projection head) that algorithms apply to features."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn


class ModelOutput(NamedTuple):
    logits: Tensor
    features: Tensor


class Network(nn.Module):
    """Backbone + heads. ``net(x)`` returns ``ModelOutput``; heads live in ``net.heads``."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads or {})
        self.feat_dim = backbone.feat_dim
        self.num_classes = backbone.num_classes

    def forward(self, x: Tensor) -> ModelOutput:
        return self.backbone(x)
