"""Distribution alignment: ring-buffer running mean (window), update-then-align, renormalisation."""
from __future__ import annotations

import pytest
import torch

from imbssl.pseudo.dist_align import DistAlign, build_dist_align


def _batch(row):
    return torch.tensor([row, row])  # two identical rows: batch mean == row


def test_window_two_three_updates_uniform():
    da = DistAlign(2, target="uniform", window=2)
    # update 1: running mean [0.8, 0.2]; p * 0.5 / mean -> [0.5, 0.5] after renormalising
    out1 = da(_batch([0.8, 0.2]))
    assert torch.allclose(out1, torch.full((2, 2), 0.5), atol=1e-5)
    # update 2: mean of [0.8, 0.2] and [0.6, 0.4] = [0.7, 0.3]; [0.6/0.7, 0.4/0.3] normalised
    out2 = da(_batch([0.6, 0.4]))
    a, b = 0.6 / 0.7, 0.4 / 0.3
    assert torch.allclose(out2[0], torch.tensor([a / (a + b), b / (a + b)]), atol=1e-5)
    # update 3 overwrites the oldest slot: mean of [0.6, 0.4], [0.5, 0.5] = [0.55, 0.45];
    # [0.5/0.55, 0.5/0.45] normalised = [0.45, 0.55]
    out3 = da(_batch([0.5, 0.5]))
    assert torch.allclose(out3, torch.tensor([[0.45, 0.55]] * 2), atol=1e-5)
    assert int(da.count) == 3
    assert torch.allclose(da.running_mean(), torch.tensor([0.55, 0.45]))


def test_labeled_target_and_renormalisation():
    da = DistAlign(2, target="labeled", window=128, labeled_prior=torch.tensor([3.0, 1.0]))
    assert torch.allclose(da.target, torch.tensor([0.75, 0.25]))
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])  # batch mean [0.7, 0.3]
    out = da(probs)
    row0 = torch.tensor([0.5 * 0.75 / 0.7, 0.5 * 0.25 / 0.3])
    row1 = torch.tensor([0.9 * 0.75 / 0.7, 0.1 * 0.25 / 0.3])
    expected = torch.stack([row0 / row0.sum(), row1 / row1.sum()])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.sum(-1), torch.ones(2))


def test_state_dict_resumes_running_mean():
    da = DistAlign(3, target="uniform", window=4)
    torch.manual_seed(0)
    for _ in range(6):
        da(torch.softmax(torch.randn(5, 3), -1))
    state = da.state_dict()
    assert set(state) == {"history", "count"}
    resumed = DistAlign(3, target="uniform", window=4)
    resumed.load_state_dict(state)
    probs = torch.softmax(torch.randn(5, 3), -1)
    assert torch.allclose(da(probs), resumed(probs))


def test_build_and_errors():
    assert build_dist_align("none", 3, torch.ones(3) / 3) is None
    assert isinstance(build_dist_align("uniform", 3, torch.ones(3) / 3), DistAlign)
    with pytest.raises(ValueError):
        DistAlign(3, target="bogus")
    with pytest.raises(ValueError):
        DistAlign(3, target="labeled")
