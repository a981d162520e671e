"""The network every algorithm trains: a backbone returning (logits, features), plus optional
named heads (a rotation classifier, a projection head) that algorithms apply to features."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ModelOutput(NamedTuple):
    logits: Tensor
    features: Tensor


class BranchOutput(NamedTuple):
    """A network with classwise batch normalisation (``ClasswiseNorms``): ``logits`` and
    ``features`` are the mean over the branches, ``branch_logits`` (n, B, K) and
    ``branch_features`` (n, B, D) each branch's."""

    logits: Tensor
    features: Tensor
    branch_logits: Tensor
    branch_features: Tensor


class ClasswiseNorms(nn.Module):
    """CPE's classwise batch normalisation (Ma et al., AAAI 2024, Sec. 3.3; official
    ``semilearn/nets/wrn/wrn_cbn.py``: ``BNH``, ``BNM``, ``BNT``): ``n`` batch-norm layers,
    each applied to the whole last feature map, then global average pooling. A method trains
    each branch on the pseudo-labels of its own classes. PyTorch's default momentum (0.1) and
    eps, as the official ``nn.BatchNorm2d(num_features)``; ``model.bn_momentum`` leaves them."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(branches))

    def forward(self, fmap: Tensor) -> Tensor:
        """(n, B, D) pooled features of each branch."""
        return torch.stack([torch.flatten(F.adaptive_avg_pool2d(norm(fmap), 1), 1)
                            for norm in self.norms])


class Network(nn.Module):
    """Backbone + heads. ``net(x)`` returns ``ModelOutput``; heads live in ``net.heads``.
    With ``classwise_norms`` (``add_classwise_norms``) it returns a ``BranchOutput``."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads or {})
        self.feat_dim = backbone.feat_dim
        self.num_classes = backbone.num_classes
        self.classwise_norms: ClasswiseNorms | None = None

    def add_classwise_norms(self, branches: int) -> None:
        """Classwise batch normalisation with ``branches`` branches on the backbone's last
        feature map (``backbone.feature_map``) before pooling."""
        self.classwise_norms = ClasswiseNorms(self.feat_dim, branches)

    def forward(self, x: Tensor) -> ModelOutput | BranchOutput:
        if self.classwise_norms is None:
            return self.backbone(x)
        branch_feats = self.classwise_norms(self.backbone.feature_map(x))
        branch_logits = self.backbone.fc(branch_feats)
        # official CBNNet: logits = (logitsH + logitsM + logitsT) / 3
        return BranchOutput(branch_logits.mean(0), branch_feats.mean(0), branch_logits,
                            branch_feats)
