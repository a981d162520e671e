"""What the trainer builds before the loop and the schedule it follows: the device, the
optimizer (with its weight-decay scope) and the learning-rate factor of each step."""
from __future__ import annotations

import math

import torch

from imbssl.engine import distributed as ddp
from imbssl.engine.config import OptimConfig
from imbssl.errors import UserError


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str):
        raise UserError(f"device={name!r} is not a device name; use auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but CUDA is not available; use device=cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and ddp.is_distributed():  # one GPU per process
        device = torch.device("cuda", ddp.local_rank())
    return device


def lr_factor(step: int, total: int, schedule: str, warmup: int,
              milestones=(), gamma: float = 1.0) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":  # FixMatch: cos(7 pi k / (16 K))
        return math.cos(7.0 * math.pi * step / (16.0 * total))
    if schedule == "multistep":  # official WarmupMultiStepLR: gamma ** bisect_right(steps, k)
        return gamma ** sum(step >= m for m in milestones)
    return 1.0


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """SGD (Nesterov), or with ``name=adamw`` Adam (PyTorch's default betas and eps) with
    decoupled weight decay ``p <- p (1 - lr wd)`` each step (official CDMAD/DARP/ABC: Adam,
    and ``param.mul_(1 - wd * lr)`` in ``WeightEMA.step``); weight decay on every parameter
    (``decay_scope=all``, official DASO) or not on biases and batch-norm parameters
    (``no_bias_bn``, FixMatch codebases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = cfg.decay_scope == "no_bias_bn" and (p.ndim <= 1 or "bn" in name)
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fast)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           **fast)

