"""Wide ResNet (Zagoruyko & Komodakis 2016) as configured by FixMatch and DASO for CIFAR:
WRN-28-2 (1.47 M parameters), batch-norm momentum 0.001, leaky ReLU 0.1."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.models.base import ModelOutput

BN_MOMENTUM = 0.001
LEAKY_SLOPE = 0.1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
    """Pre-activation residual block; the first block of a stage may activate before the
    shortcut (FixMatch's ``activate_before_residual``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.bn1 = _bn(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = _bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: Tensor) -> Tensor:
        act = F.leaky_relu(self.bn1(x), LEAKY_SLOPE)
        if self.shortcut is None:
            return x + self.conv2(F.leaky_relu(self.bn2(self.conv1(act)), LEAKY_SLOPE))
        # FixMatch's WRN: a widening block convolves the activated input only in the first
        # stage; later stages convolve (and shortcut) the raw input.
        src = act if self.activate_before_residual else x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(src)), LEAKY_SLOPE))
        return self.shortcut(src) + out


class WideResNet(nn.Module):
    """WRN-depth-width; ``forward`` returns logits and the pooled features."""

    def __init__(self, num_classes: int, depth: int = 28, width: int = 2, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [BasicBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                 stride if j == 0 else 1, activate_before_residual=(i == 0 and j == 0))
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = _bn(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feat_dim, self.num_classes = widths[3], num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> ModelOutput:
        out = self.stages(self.conv(x))
        out = F.leaky_relu(self.bn(out), LEAKY_SLOPE)
        feats = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return ModelOutput(self.fc(feats), feats)
