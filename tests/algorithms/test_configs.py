"""configs/algorithm/*.yaml: every key is a typed field of the algorithm's Config, with paper
defaults identical to the dataclass defaults, each value with its source comment."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from imbssl.algorithms import get_algorithm

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "algorithm"
#: crt and darp_estim interpolate run-folder paths (``${run_dir}``): their own tests compose them
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
               if not p.stem.endswith("_schema") and p.stem not in ("crt", "darp_estim"))


@pytest.mark.parametrize("name", NAMES)
def test_yaml_matches_schema(name):
    raw = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert list(raw.defaults) == [f"{name}_schema", "_self_"]
    values = OmegaConf.to_container(raw)
    values.pop("defaults")
    assert values["name"] == name
    cls = get_algorithm(name)
    schema = OmegaConf.structured(cls.Config)
    merged = OmegaConf.merge(schema, values)  # raises on unknown keys or wrong types
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if name != "supervised":  # every default of an SSL algorithm is written (and cited) in yaml
        assert set(values) == fields
    # the yaml restates the dataclass defaults (one source of truth, two places to read it)
    assert cfg == cls.Config()
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        key = line.split(":")[0]
        if key in values and key != "name":  # every default with its source
            assert "#" in line, line
