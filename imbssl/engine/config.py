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
from omegaconf import MISSING, DictConfig

from imbssl.data import DatasetConfig
from imbssl.diagnostics.loggers import LoggerConfig
from imbssl.models import ModelConfig
from imbssl.typed_config import describe_config_error, to_object, typed  # noqa: F401

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum as in FixMatch and DASO (lr 0.03, momentum 0.9, wd 5e-4);
    ``name=adamw``: Adam with decoupled weight decay (momentum and nesterov unused)."""

    name: str = "sgd"  # sgd | adamw
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
    #: median (DASO: "the median of the last 20 evaluations") | mean (the papers that report
    #: the mean of the last k evaluations); summary.json's window block is <reduce>_last<k>
    summary_reduce: str = "median"
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

# ----------------------------------------------------------------- what resume may change
#: Keys a resumed run may change (``resume=true`` with another value is accepted and recorded
#: in meta.json's ``resumes``): none of them changes what a step computes.
#: trainer.iterations extends (or, down to the checkpoint's step, shortens) the run: the only
#: one that changes the remaining steps (a cosine schedule and an algorithm's phases are
#: computed from it), which is the point of extending; log/checkpoint intervals, the number of
#: checkpoints kept, progress bar, TensorBoard, report and the summary window only change what
#: is written; loggers, names and notes only where it is shown; run_dir, resume and overwrite
#: are how the folder was found. Everything else (seeds, data, model, algorithm, refiner,
#: optimizer, batch size, evaluation interval and batch size, precision, device) is refused.
RESUMABLE_KEYS = (
    "trainer.iterations", "trainer.log_interval", "trainer.checkpoint_interval",
    "trainer.keep_checkpoints", "trainer.progress", "trainer.tensorboard", "trainer.report",
    "trainer.summary_last", "trainer.summary_reduce", "logger", "experiment_name", "notes", "run_dir", "resume",
    "overwrite",
)
_MISSING = object()


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, current value)`` for every key whose value differs. A key that
    only one side has (a field that another imbssl version added or removed) is left out:
    the run could not have set it."""
    old, new = flatten(saved), flatten(current)
    return {k: (old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]}


def check_top_level_keys(cfg: DictConfig) -> None:
    """A top-level key that the schema does not know (``+seeed=3``) is a one-line
    ``UserError``: Hydra's ``+`` adds any key, and an unread key is a silent typo."""
    from dataclasses import fields

    from imbssl.errors import UserError

    known = {f.name for f in fields(Config)}
    unknown = [k for k in cfg.keys() if k not in known and k != "hydra"]
    if unknown:
        raise UserError(f"unknown top-level config key {unknown[0]!r} (from +{unknown[0]}=...);"
                        f" valid keys there: {', '.join(sorted(known))}")
