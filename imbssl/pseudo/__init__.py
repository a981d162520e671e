"""Pseudo-label refiners (DASO) and distribution alignment."""
from __future__ import annotations

from imbssl.errors import UnknownNameError
from imbssl.pseudo.base import IdentityRefiner


def build_refiner(cfg, num_classes: int, feat_dim: int):
    """The refiner named by ``cfg.name`` (``none`` or ``daso``)."""
    name = getattr(cfg, "name", "none") if cfg is not None else "none"
    if name == "none":
        return IdentityRefiner()
    if name == "daso":
        from imbssl.pseudo.daso import DASO

        return DASO.from_config(cfg, num_classes, feat_dim)
    raise UnknownNameError(f"unknown pseudo-label refiner {name!r}; choose 'none' or 'daso'")


__all__ = ["IdentityRefiner", "build_refiner"]
