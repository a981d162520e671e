"""Networks by name: ``wrn28_2``, ``wrn28_8``, ``wrn16_1``, ``small_cnn``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from imbssl.errors import UnknownNameError, UserError
from imbssl.models.base import BranchOutput, ModelOutput, Network
from imbssl.models.ema import EMA
from imbssl.models.small_cnn import SmallCNN
from imbssl.models.wrn import RESIDUALS, WideResNet


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    ema_decay: float = 0.999
    compile: bool = False
    channels_last: bool = True
    #: normalisation layers: batch | group | none (group and none: small_cnn only)
    norm: str = "batch"
    #: momentum of every batch-norm layer; null keeps the backbone's own (WRN 0.1, small_cnn 0.01)
    bn_momentum: Optional[float] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    #: WRN widening-block input: official (DASO / TF FixMatch) | port (PyTorch FixMatch ports)
    wrn_residual: str = "official"
    #: EMA decay warm-up min(1 - 1/(step+1), ema_decay) (official DASO ema_model.py)
    ema_warmup: bool = False
    #: EMA of buffers (batch-norm statistics): copy from the model | average with ema_decay
    ema_buffers: str = "copy"
    #: keep the EMA network in train mode (its labeled forward uses batch statistics), eval
    #: mode only while evaluating (official DASO); false: always eval mode
    ema_train_mode: bool = False
    #: branches of classwise batch normalisation on the last feature map (CPE's CBN, Ma et al.
    #: AAAI 2024: 3); 0: none. Logits and features are then the mean over the branches
    classwise_bn: int = 0


def _backbones():
    def wrn(depth: int, width: int):
        return lambda k, c, norm, residual: WideResNet(k, depth=depth, width=width,
                                                       in_channels=c, residual=residual)

    return {
        "wrn28_2": wrn(28, 2),
        "wrn28_8": wrn(28, 8),
        "wrn16_1": wrn(16, 1),  # CPU mini protocol: 0.18 M parameters, 28 M MACs / image
        "small_cnn": lambda k, c, norm, residual: SmallCNN(k, in_channels=c, norm=norm),
    }


MODEL_NAMES = tuple(_backbones())
#: models that take ``norm`` other than "batch"
NORM_CHOICES = {"small_cnn": SmallCNN.NORMS}


def build_model(name: str, num_classes: int, in_channels: int,
                heads: dict[str, nn.Module] | None = None, norm: str = "batch",
                bn_momentum: float | None = None, wrn_residual: str = "official",
                classwise_bn: int = 0) -> Network:
    """A ``Network`` with the named backbone and the given heads (``net.heads.update`` adds
    more later, e.g. ``Algorithm.make_heads(cfg, net.feat_dim, num_classes)``).
    ``bn_momentum`` (if given) is set on every batch-norm layer but the ``classwise_bn``
    branches (``ClasswiseNorms``), which keep PyTorch's default as official CPE."""
    if name not in MODEL_NAMES:
        raise UnknownNameError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    choices = NORM_CHOICES.get(name, ("batch",))
    if norm not in choices:
        raise UserError(f"model.norm={norm!r} is not available for model={name}; "
                        f"choose one of {list(choices)}")
    if wrn_residual not in RESIDUALS:
        raise UserError(f"model.wrn_residual={wrn_residual!r}; choose one of {list(RESIDUALS)}")
    if classwise_bn < 0 or (classwise_bn and norm != "batch"):
        raise UserError(f"model.classwise_bn={classwise_bn} needs >= 0 and model.norm=batch")
    net = Network(_backbones()[name](num_classes, in_channels, norm, wrn_residual), heads)
    if bn_momentum is not None:
        set_bn_momentum(net, bn_momentum)
    if classwise_bn:  # after set_bn_momentum: the branches keep their own momentum
        net.add_classwise_norms(classwise_bn)
    return net


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Set ``momentum`` on every batch-norm layer of ``module``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


__all__ = ["EMA", "BranchOutput", "ModelConfig", "ModelOutput", "Network", "build_model", "MODEL_NAMES"]
