"""Algorithm registry: every module in this package registers its algorithms by name."""
from __future__ import annotations

import importlib
import pkgutil

from imbssl.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    LabeledSetUpdate,
    StepState,
)
from imbssl.errors import UnknownNameError

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(name: str):
    """Class decorator: make an algorithm available as ``algorithm=<name>``."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return wrap


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def registry() -> dict[str, type[Algorithm]]:
    _discover()
    return dict(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    algos = registry()
    if name not in algos:
        raise UnknownNameError(f"unknown algorithm {name!r}; choose one of {sorted(algos)}")
    return algos[name]


__all__ = ["Algorithm", "AlgorithmConfig", "Batch", "LabeledSetUpdate", "StepState", "register",
           "registry", "get_algorithm"]
