"""Algorithm registry: every module in this package registers its algorithms by name."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from imbssl.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Batch,
    LabeledSetUpdate,
    StepState,
)
from imbssl.errors import UnknownNameError

_REGISTRY: dict[str, type[Algorithm]] = {}
#: name -> function(cfg) -> the class that trains with cfg (compositions, e.g. CReST + a base)
_LEARNERS: dict[str, Callable[[AlgorithmConfig], type[Algorithm]]] = {}


def register(name: str, learner: Callable[[AlgorithmConfig], type[Algorithm]] | None = None):
    """Class decorator: make an algorithm available as ``algorithm=<name>``. ``learner``: for a
    composition whose class depends on its config (CReST's generations around FixMatch or
    ReMixMatch, ``algorithm.base``), the function that names the class for a config;
    ``algorithm_class`` calls it. The decorated class gives the config schema."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registered_name = name
        if learner is not None:
            _LEARNERS[name] = learner
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


def algorithm_class(name: str, cfg: AlgorithmConfig) -> type[Algorithm]:
    """The class that trains ``algorithm=<name>`` with ``cfg``: the registered class, or the
    one its ``learner`` function names for ``cfg``."""
    cls = get_algorithm(name)
    learner = _LEARNERS.get(name)
    return learner(cfg) if learner is not None else cls


__all__ = ["Algorithm", "AlgorithmConfig", "Batch", "LabeledSetUpdate", "StepState", "register",
           "registry", "get_algorithm", "algorithm_class"]
