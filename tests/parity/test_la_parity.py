"""Parity with the official LA lines of DASO (github.com/ytaek-oh/daso at commit
3541a6c452f895056f5fdac440b5d0c557dea9f0): the logit-adjusted labeled loss's logits
(lib/algorithm/fixmatch.py ``l_logits += (self.tau * self.p_data.view(1, -1).log())``, the same
line in supervised.py and fm_crest.py) and the post-hoc adjustment of evaluation
(lib/algorithm/base_algorithm.py ``outputs_la = outputs - self.p_data.view(1, -1).log()``).

Reference values: those two official lines were executed once, unmodified, with ``self.tau``
2.0, ``self.p_data`` the normalised labeled counts (40, 20, 10, 5, 2) and logits
``torch.randn(4, 5, generator=torch.Generator().manual_seed(0))``; the official code is not
part of this repository.
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms import get_algorithm

COUNTS = (40, 20, 10, 5, 2)
LOSS_LOGITS = [
    [-2.4356918, -3.8485065, -4.3330193, -5.9026141, -6.702477],
    [-2.8649468, -3.0375066, -2.2294347, -5.000639, -7.4590287],
    [0.1338083, -2.4300969, -2.6930747, -3.882401, -6.3550177],
    [-2.1535287, -1.7643197, -2.8234315, -3.4637547, -7.2475796],
]  # tau 2
POSTHOC_LOGITS = [
    [-0.4709139, 0.1957129, 1.7906418, 2.3004887, 4.2494974],
    [-0.9001691, 1.0067127, 3.8942266, 3.2024641, 3.4929457],
    [2.0985861, 1.6141225, 3.4305866, 4.3207016, 4.5969563],
    [-0.1887508, 2.2798996, 3.3002295, 4.7393484, 3.7043951],
]  # tau 1 (official eval_loop)


def logits() -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(0))


def build(name: str, mode: str, tau: float):
    cls = get_algorithm(name)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    return cls(cls.Config(logit_adjust=mode, la_tau=tau), 5, 8, labels)


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "crest_plus"])
def test_loss_logits_equal_official(name):
    algo = build(name, "loss", 2.0)
    got = algo.labeled_logits(logits())
    assert torch.allclose(got, torch.tensor(LOSS_LOGITS), atol=1e-6)


@pytest.mark.parametrize("name", ["supervised", "fixmatch"])
def test_posthoc_logits_equal_official(name):
    algo = build(name, "posthoc", 1.0)
    got = algo.posthoc_adjust(logits())
    assert torch.allclose(got, torch.tensor(POSTHOC_LOGITS), atol=1e-6)
