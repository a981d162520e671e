"""Wide ResNet (Zagoruyko & Komodakis 2016) as configured by FixMatch and DASO for CIFAR:
WRN-28-2 (1.47 M parameters), leaky ReLU 0.1, and the smaller WRN-16-1 of the CPU mini
protocol (same blocks, 2 per stage, widths 16/32/64).

Two details differ between the references, each a constructor argument:

* ``residual``: in a widening block of stages 2 and 3, the official DASO code
  (``lib/models/wrn.py``, ``residual``) and Google's TensorFlow FixMatch convolve the
  *activated* input (BN, LeakyReLU, conv) and give the 1x1 shortcut the *raw* input
  (``"official"``, the default). Several PyTorch FixMatch ports convolve the raw input there,
  so that block's first batch norm never receives a gradient (``"port"``, kept only for
  comparing with those ports).
* ``bn_momentum``: official DASO uses PyTorch's default 0.1; the FixMatch ports use 0.001.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.models.base import ModelOutput

LEAKY_SLOPE = 0.1
BN_MOMENTUM_OFFICIAL = 0.1  # official DASO lib/models/wrn.py: nn.BatchNorm2d(c)
BN_MOMENTUM_PORT = 0.001  # kekmodel/FixMatch-pytorch, USB
RESIDUALS = ("official", "port")


class BasicBlock(nn.Module):
    """Pre-activation residual block. The first block of the network activates before the
    shortcut too (FixMatch's ``activate_before_residual``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool,
                 bn_momentum: float = BN_MOMENTUM_OFFICIAL, residual: str = "official"):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.bn1 = nn.BatchNorm2d(c_in, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        act = F.leaky_relu(self.bn1(x), LEAKY_SLOPE)
        if self.shortcut is None:
            return x + self._branch(act)
        short_in = act if self.activate_before_residual else x
        conv_in = act if self.residual == "official" else short_in
        return self.shortcut(short_in) + self._branch(conv_in)

    def _branch(self, x: Tensor) -> Tensor:
        """conv, BN, LeakyReLU, conv."""
        return self.conv2(F.leaky_relu(self.bn2(self.conv1(x)), LEAKY_SLOPE))


class WideResNet(nn.Module):
    """WRN-depth-width; ``forward`` returns logits and the pooled features."""

    def __init__(self, num_classes: int, depth: int = 28, width: int = 2, in_channels: int = 3,
                 bn_momentum: float = BN_MOMENTUM_OFFICIAL, residual: str = "official"):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [BasicBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                 stride if j == 0 else 1,
                                 activate_before_residual=(i == 0 and j == 0),
                                 bn_momentum=bn_momentum, residual=residual)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feat_dim, self.num_classes = widths[3], num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        """As official DASO: Kaiming normal (fan_out) convolutions, unit BN, Xavier linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last activated feature map, before global pooling."""
        return F.leaky_relu(self.bn(self.stages(self.conv(x))), LEAKY_SLOPE)

    def forward(self, x: Tensor) -> ModelOutput:
        feats = torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)
        return ModelOutput(self.fc(feats), feats)
