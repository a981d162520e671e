"""A small CNN for 8x8 images (scikit-learn digits): fast enough for the CPU quickstart.

``norm`` picks the normalisation after each convolution: ``batch`` (default), ``group``
(GroupNorm with up to 8 groups: per-image statistics, so a step does not depend on how the
batch is split over processes; used by the CPU multi-process tests, where SyncBatchNorm does
not run) or ``none``."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from imbssl.models.base import ModelOutput


class SmallCNN(nn.Module):
    """conv(32)-conv(64)-pool-conv(feat_dim)-global pool -> features -> linear."""

    NORMS = ("batch", "group", "none")

    def __init__(self, num_classes: int, in_channels: int = 1, feat_dim: int = 64,
                 width: int = 32, norm: str = "batch"):
        super().__init__()
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none")
            if norm == "batch":
                layer: nn.Module = nn.BatchNorm2d(c_out, momentum=0.01)
            elif norm == "group":
                layer = nn.GroupNorm(math.gcd(8, c_out), c_out)
            else:
                layer = nn.Identity()
            return [conv, layer, nn.LeakyReLU(0.1)]

        self.body = nn.Sequential(*block(in_channels, width), *block(width, 2 * width),
                                  nn.MaxPool2d(2), *block(2 * width, feat_dim))
        self.fc = nn.Linear(feat_dim, num_classes)
        self.feat_dim, self.num_classes = feat_dim, num_classes

    def feature_map(self, x: Tensor) -> Tensor:
        """The last activated feature map, before global pooling."""
        return self.body(x)

    def forward(self, x: Tensor) -> ModelOutput:
        feats = torch.flatten(nn.functional.adaptive_avg_pool2d(self.feature_map(x), 1), 1)
        return ModelOutput(self.fc(feats), feats)
