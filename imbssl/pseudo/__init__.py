"""Pseudo-label refiners (DASO) and distribution alignment."""
from __future__ import annotations

from dataclasses import dataclass

from imbssl.errors import UnknownNameError, UserError
from imbssl.pseudo.base import IdentityRefiner
from imbssl.pseudo.darp import DARP, DARPConfig
from imbssl.pseudo.daso import DASO, DASOConfig
from imbssl.pseudo.features import FeatureTap


@dataclass
class NoRefinerConfig:
    """Schema of ``pseudo=none``: pseudo-labels from the classifier alone."""

    name: str = "none"


#: refiner name -> config schema (``pseudo/<name>_schema`` in Hydra's ConfigStore)
REFINER_CONFIGS: dict[str, type] = {"none": NoRefinerConfig, "daso": DASOConfig}
REFINER_CONFIGS["darp"] = DARPConfig


def refiner_config(name: str) -> type:
    """The config schema of the refiner ``name``."""
    if name not in REFINER_CONFIGS:
        raise UnknownNameError(f"unknown pseudo-label refiner {name!r} (pseudo.name={name}); "
                               f"choose one of {sorted(REFINER_CONFIGS)}")
    return REFINER_CONFIGS[name]


def build_refiner(cfg, num_classes: int, feat_dim: int, *, num_unlabeled: int = 0,
                  labeled_counts=None, has_validation: bool = True):
    """The refiner named by ``cfg.name``; ``num_unlabeled``, ``labeled_counts`` and
    ``has_validation``: the unlabeled set's size, the labeled class counts and whether a
    validation set exists (refiners with per-image state or estimates)."""
    name = getattr(cfg, "name", "none") if cfg is not None else "none"
    refiner_config(name)
    if name == "daso":
        return DASO.from_config(cfg, num_classes, feat_dim)
    if name == "darp":
        if cfg.target == "estimate" and not has_validation:
            raise UserError("pseudo.target=estimate (DARP) estimates the unlabeled class "
                            "distribution on the validation set; set dataset.num_valid_per_class")
        return DARP.from_config(cfg, num_classes, num_unlabeled,
                                labeled_counts if labeled_counts is not None else [1] * num_classes)
    return IdentityRefiner()


__all__ = ["DARP", "DARPConfig", "DASO", "REFINER_CONFIGS", "DASOConfig", "FeatureTap", "IdentityRefiner",
           "NoRefinerConfig", "build_refiner", "refiner_config"]
