"""Golden values, computed by hand, for the shared operations and FixMatch's mask."""
from __future__ import annotations

import torch

from imbssl.algorithms import ops
from imbssl.algorithms.fixmatch import fixmatch_mask


def test_sharpen_golden():
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    # T = 0.5: p^2 / sum p^2 -> [0.36, 0.16] / 0.52
    expected = torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]])
    assert torch.allclose(ops.sharpen(p, 0.5), expected, atol=1e-6)
    # T = 1 leaves p unchanged
    assert torch.allclose(ops.sharpen(p, 1.0), p)


def test_mixup_lambda_prime_is_max(monkeypatch):
    # Gamma draws 1 and 3 -> lambda = 1 / 4 -> lambda' = max(0.25, 0.75) = 0.75
    monkeypatch.setattr(torch, "_standard_gamma", lambda c: torch.tensor([1.0, 3.0]))
    assert torch.isclose(ops.mixup_lambda(0.75, "cpu"), torch.tensor(0.75))
    monkeypatch.setattr(torch, "_standard_gamma", lambda c: torch.tensor([3.0, 1.0]))
    assert torch.isclose(ops.mixup_lambda(0.75, "cpu"), torch.tensor(0.75))


def test_mixup_golden(monkeypatch):
    monkeypatch.setattr(torch, "_standard_gamma", lambda c: torch.tensor([1.0, 4.0]))  # 0.8
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: torch.tensor([1, 0]))
    x = torch.tensor([[10.0], [20.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xm, ym, lam = ops.mixup(x, y, 0.75)
    assert torch.isclose(lam, torch.tensor(0.8))
    assert torch.allclose(xm, torch.tensor([[12.0], [18.0]]))  # 0.8*10+0.2*20, 0.8*20+0.2*10
    assert torch.allclose(ym, torch.tensor([[0.8, 0.2], [0.2, 0.8]]))


def test_mixup_lambda_sampled_in_upper_half():
    torch.manual_seed(0)
    lams = torch.stack([ops.mixup_lambda(0.75, "cpu") for _ in range(200)])
    assert bool((lams >= 0.5).all()) and bool((lams <= 1.0).all())
    assert lams.std() > 0.05  # actually random


def test_one_hot():
    assert torch.equal(ops.one_hot(torch.tensor([2, 0]), 3),
                       torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_fixmatch_mask_golden():
    probs = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.05, 0.95], [0.94, 0.06]])
    mask, labels = fixmatch_mask(probs, 0.95)
    assert torch.equal(mask, torch.tensor([1.0, 0.0, 1.0, 0.0]))  # 0.95 >= 0.95 counts
    assert torch.equal(labels[[0, 2, 3]], torch.tensor([0, 1, 0]))


def test_rotation_golden():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    other = torch.tensor([[5.0, 6.0], [7.0, 8.0]]).view(1, 1, 2, 2)
    x = torch.cat([img, img, img, img, other])
    out = ops.rotate_batch(x, torch.tensor([0, 1, 2, 3, 1]))
    expected = torch.tensor([
        [[1.0, 2.0], [3.0, 4.0]],  # 0 degrees
        [[2.0, 4.0], [1.0, 3.0]],  # 90 degrees counter-clockwise
        [[4.0, 3.0], [2.0, 1.0]],  # 180
        [[3.0, 1.0], [4.0, 2.0]],  # 270
        [[6.0, 8.0], [5.0, 7.0]],  # second image, 90
    ]).unsqueeze(1)
    assert torch.equal(out, expected)


def test_linear_rampup():
    assert ops.linear_rampup(0, 1000, 0.016) == 0.0
    assert ops.linear_rampup(8, 1000, 0.016) == 0.5  # ramp length 16 steps
    assert ops.linear_rampup(500, 1000, 0.016) == 1.0
    assert ops.linear_rampup(3, 1000, 0.0) == 1.0
