"""Typed configuration: one dataclass per concern, registered in Hydra's ConfigStore so a
misspelled key or a wrong type fails when the config is composed, before any work starts.

Each group's YAML file starts with ``defaults: [<name>_schema, _self_]``; the schemas are
registered here (algorithms and refiners from their own registries, no hand-kept list).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from imbssl.data import DatasetConfig
from imbssl.models import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum as in FixMatch and DASO (lr 0.03, momentum 0.9, wd 5e-4)."""

    name: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    #: constant (DASO's protocol: APPLY_SCHEDULER=False), cosine (FixMatch: cos(7*pi*k/16K))
    #: or multistep (official DASO supervised.yaml: WarmupMultiStepLR)
    schedule: str = "constant"
    warmup_iters: int = 0
    #: multistep: the lr is multiplied by ``gamma`` at each of these steps (official STEPS)
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1  # multistep decay factor (official SOLVER.GAMMA)
    #: which parameters weight decay applies to: all (official DASO lib/solver/build.py:
    #: model.parameters()) | no_bias_bn (FixMatch codebases: biases and batch norm exempt)
    decay_scope: str = "no_bias_bn"


@dataclass
class TrainerConfig:
    iterations: int = 1000
    batch_size: int = 64  # labeled images per step; unlabeled = batch_size * algorithm.uratio
    eval_interval: int = 100
    log_interval: int = 20
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    summary_last: int = 20  # DASO protocol: median of the last 20 evaluations
    eval_batch_size: int = 1024
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False
    progress: bool = True
    tensorboard: bool = True
    report: bool = True  # plots + HTML/Markdown report in the run folder at the end
    deterministic: bool = False
    #: multi-GPU runs (torchrun): batch-norm statistics over the global batch (SyncBatchNorm)
    sync_bn: bool = False


@dataclass
class LoggerConfig:
    """Experiment tracker beside TensorBoard (imbssl/diagnostics/loggers.py)."""

    name: str = "none"  # none | wandb | mlflow
    project: str = "imbssl"  # W&B project / MLflow experiment
    run_name: str = ""  # "" = the run folder's name
    mode: str = "offline"  # W&B: offline (files in the run folder, `wandb sync` later) | online
    tracking_uri: str = ""  # MLflow: "" = sqlite:///<run_dir>/mlflow.db; or file:/..., sqlite:///..


@dataclass
class Config:
    dataset: Any = MISSING
    algorithm: Any = MISSING
    pseudo: Any = MISSING
    model: Any = MISSING
    optim: Any = MISSING
    trainer: Any = MISSING
    logger: Any = field(default_factory=LoggerConfig)
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    experiment_name: str = ""
    notes: dict = field(default_factory=dict)


def experiment_generator(stem: str):
    """The generator script ``configs/experiment/<stem>.py`` as a module (its ``rows()`` and
    ``main(argv)``: ``main(["--check"])`` is 0 when the files on disk are what it writes)."""
    import importlib.util
    import sys

    path = CONFIG_DIR / "experiment" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"imbssl_experiment_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    from imbssl.algorithms import registry
    from imbssl.pseudo import REFINER_CONFIGS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    for name, schema in REFINER_CONFIGS.items():
        cs.store(group="pseudo", name=f"{name}_schema", node=schema)
    for name, cls in registry().items():
        cs.store(group="algorithm", name=f"{name}_schema", node=cls.Config)


def compose(overrides: list[str]) -> DictConfig:
    """The config that ``imbssl train overrides`` will run (validated against the schemas)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


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
