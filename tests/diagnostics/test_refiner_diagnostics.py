"""The refiner diagnostics hook: every pseudo-label component publishes its own per-class
state (``per_class_diagnostics``), which the trainer logs as per_class.csv rows (source
``refiner``); the tracker reads no attribute of a component by name."""
from __future__ import annotations

import inspect

import pytest
import torch

import imbssl.diagnostics.tracker as tracker
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig
from imbssl.pseudo import DARP, DASO
from imbssl.pseudo.dist_align import DistAlign


def test_darp_publishes_its_target_counts():
    darp = DARP(3, num_unlabeled=60, labeled_counts=[30, 10, 5])
    rows = tracker.refiner_rows(4, darp, ["a", "b", "c"])
    assert {(r["kind"], r["metric"]) for r in rows} == {("darp", "target_count")}
    got = [r["value"] for r in rows]
    assert got == pytest.approx([60 * 30 / 45, 60 * 10 / 45, 60 * 5 / 45])


def test_distribution_alignment_publishes_target_and_running_mean():
    align = DistAlign(2, target="uniform", window=4)
    align(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))
    state = align.per_class_diagnostics()
    torch.testing.assert_close(state["target"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(state["running_mean"], torch.tensor([0.8, 0.2]))


def test_algorithm_lists_refiner_then_alignment():
    cfg = FixMatchConfig(dist_align="uniform")
    algo = FixMatch(cfg, 3, 4, torch.tensor([0, 0, 1, 2]), refiner=DASO(3, 4))
    parts = algo.per_class_diagnostics()
    assert list(parts) == ["daso", "dist_align"]
    assert set(parts["daso"]) == {"m_hat", "blend_weight"}
    rows = tracker.diagnostic_rows(2, parts)
    assert len(rows) == 3 * 2 + 3 * 2 and {r["source"] for r in rows} == {"refiner"}
    assert FixMatch(FixMatchConfig(), 3, 4, torch.tensor([0, 1, 2])).per_class_diagnostics() == {}


def test_the_tracker_reads_no_attribute_by_name():
    source = inspect.getsource(tracker)
    assert "getattr" not in source and "hasattr" not in source
