"""Networks by name: ``wrn28_2``, ``wrn28_8``, ``small_cnn``."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from imbssl.errors import UnknownNameError, UserError
from imbssl.models.base import ModelOutput, Network
from imbssl.models.ema import EMA
from imbssl.models.small_cnn import SmallCNN
from imbssl.models.wrn import WideResNet


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    ema_decay: float = 0.999
    compile: bool = False
    channels_last: bool = True
    #: normalisation layers: batch | group | none (group and none: small_cnn only)
    norm: str = "batch"


def _backbones():
    return {
        "wrn28_2": lambda k, c, norm: WideResNet(k, depth=28, width=2, in_channels=c),
        "wrn28_8": lambda k, c, norm: WideResNet(k, depth=28, width=8, in_channels=c),
        "small_cnn": lambda k, c, norm: SmallCNN(k, in_channels=c, norm=norm),
    }


MODEL_NAMES = tuple(_backbones())
#: models that take ``norm`` other than "batch"
NORM_CHOICES = {"small_cnn": SmallCNN.NORMS}


def build_model(name: str, num_classes: int, in_channels: int,
                heads: dict[str, nn.Module] | None = None, norm: str = "batch") -> Network:
    """A ``Network`` with the named backbone and the given heads (``net.heads.update`` adds
    more later, e.g. ``Algorithm.make_heads(cfg, net.feat_dim, num_classes)``)."""
    if name not in MODEL_NAMES:
        raise UnknownNameError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    choices = NORM_CHOICES.get(name, ("batch",))
    if norm not in choices:
        raise UserError(f"model.norm={norm!r} is not available for model={name}; "
                        f"choose one of {list(choices)}")
    return Network(_backbones()[name](num_classes, in_channels, norm), heads)


__all__ = ["EMA", "ModelConfig", "ModelOutput", "Network", "build_model", "MODEL_NAMES"]
