"""Config groups as typed dataclasses: a misspelled key or a wrong type is a one-line
``UserError`` naming the key. A ground-floor module: every layer that owns a schema (the
engine's trainer and optimizer, the loggers, the datasets) may use it.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_object(node: DictConfig | Any, schema: type | None = None) -> Any:
    """A config group as its dataclass (validated again, so a hand-made config is checked too)."""
    if isinstance(node, DictConfig):  # resolve ${...} against the full config first
        node = OmegaConf.to_container(node, resolve=True)
    if schema is None:
        return node
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(merged)


def typed(cfg: DictConfig, group: str, schema: type) -> Any:
    """``cfg.<group>`` as ``schema``; a bad key or value is a one-line ``UserError``."""
    from omegaconf.errors import OmegaConfBaseException

    from imbssl.errors import UserError

    node = cfg.get(group) if isinstance(cfg, DictConfig) else getattr(cfg, group, None)
    if node is None:
        raise UserError(f"the config has no {group!r} group; add {group}=<option>")
    try:
        return to_object(node, schema)
    except OmegaConfBaseException as exc:
        raise UserError(describe_config_error(exc, group)) from None


def describe_config_error(exc: Exception, prefix: str = "") -> str:
    """One line naming the key and the value of an OmegaConf error (and what to do)."""
    from dataclasses import fields, is_dataclass

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    key = f"{prefix}.{key}" if prefix and key and not str(key).startswith(f"{prefix}.") else key
    first = (str(getattr(exc, "msg", "") or exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, ConfigAttributeError | ConfigKeyError):
        owner = getattr(exc, "object_type", None)
        known = ([f.name for f in fields(owner)] if owner is not None and is_dataclass(owner)
                 else [])
        hint = f"; valid keys there: {', '.join(known)}" if known else "; check its spelling"
        return f"unknown config key {key!r}{hint}"
    if isinstance(exc, ValidationError):
        value = getattr(exc, "value", None)
        return f"{key}={value!r} has the wrong type ({first}); give a value of the right type"
    return f"{key}: {first}" if key else first
