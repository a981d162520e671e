"""pyproject.toml: setuptools reads the project's metadata without a deprecation warning (the
TOML-table license form warned, with builds unsupported after 2027-02-18)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_metadata_has_no_deprecation_warning():
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = pyprojecttoml.apply_configuration(Distribution(), PYPROJECT)
    messages = [f"{type(w.message).__name__}: {w.message}" for w in caught]
    assert not [m for m in messages if "Deprecat" in m], messages
    assert getattr(dist.metadata, "license_expression", None) == "MIT"
    assert "setuptools>=77" in PYPROJECT.read_text()  # the first to read SPDX expressions
