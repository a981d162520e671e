"""Every config file composes against its schema and instantiates; bad keys fail at start."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from imbssl.algorithms import get_algorithm
from imbssl.cli import CONFIG_DIR, compose
from imbssl.data import DatasetConfig
from imbssl.engine.config import OptimConfig, TrainerConfig, to_object
from imbssl.models import ModelConfig, build_model
from imbssl.pseudo import build_refiner

GROUPS = ["dataset", "algorithm", "pseudo", "model", "optim", "trainer", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def all_group_options():
    return [(g, o) for g in GROUPS for o in options(g)]


def instantiate(cfg) -> None:
    """Each group as its typed dataclass, and the network, refiner and algorithm it names."""
    to_object(cfg.dataset, DatasetConfig)
    to_object(cfg.optim, OptimConfig)
    to_object(cfg.trainer, TrainerConfig)
    model_cfg = to_object(cfg.model, ModelConfig)
    net = build_model(model_cfg.name, num_classes=10, in_channels=3)
    algo_cls = get_algorithm(cfg.algorithm.name)
    algo_cfg = to_object(cfg.algorithm, algo_cls.Config)
    net.heads.update(algo_cls.make_heads(algo_cfg, net.feat_dim, 10))
    refiner = build_refiner(to_object(cfg.pseudo), 10, net.feat_dim)
    algo_cls(algo_cfg, 10, net.feat_dim, torch.arange(10), refiner=refiner)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize(("group", "option"), all_group_options())
def test_every_config_composes_and_instantiates(group, option):
    cfg = compose([f"{group}={option}"])
    instantiate(cfg)


def test_unknown_key_fails_at_compose():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["trainer.iterationz=3"])


def test_wrong_type_fails_at_compose():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["trainer.iterations=many"])


def test_unknown_group_option_fails():
    with pytest.raises(Exception, match="algorithm"):
        compose(["algorithm=nosuchalgo"])
