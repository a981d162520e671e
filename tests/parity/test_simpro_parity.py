"""SimPro parity: imbssl's loss and multi-step prior estimate equal the official code's on fixed
seeded logits, over four epochs of three steps (the priors carry over: four M-steps).

Reference values: computed once by running the official ``train()`` of ``SimPro/train.py``
from github.com/LeapLabTHU/SimPro (commit aa2425dc36becf89389ba19b486f05164a03dcdf) on the CPU
with an identity "network" (the inputs are the logits, learning rate 0), loaders yielding the
batches of ``_batches()`` below (labeled batch 4, mu 2, 4 classes; loader lengths 5 and 12, so
``scale_ratio = 2.4``), labeled counts (10, 6, 3, 1), ``--eval-step 3``, ``--threshold 0.6``,
``--tau 2.0``, ``--ema-u 0.9``; the per-step ``Lx``/``Lu`` and the priors each epoch starts
with were read from the run (its ``AverageMeter`` updates and ``compute_adjustment_by_py``
arguments).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from imbssl.algorithms import Batch, StepState
from imbssl.algorithms.simpro import SimPro, SimProConfig, updated_priors
from imbssl.models.base import ModelOutput

K, B, MU, STEPS, EPOCHS = 4, 4, 2, 3, 4
LABELED_COUNTS = (10, 6, 3, 1)
NUM_UNLABELED = 96  # 96 // (B * MU) = 12 unlabeled batches; 20 // B = 5 labeled: r = 2.4

#: (pi_u, pi) at the start of each of the four epochs and after the last (official
#: ``compute_adjustment_by_py`` arguments at each epoch start; final ``args.estimated_dis``,
#: ``args.adapt_dis``)
REF_PRIORS = [
    ([0.25, 0.25, 0.25, 0.25],
     [0.5, 0.30000001192092896, 0.15000000596046448, 0.05000000074505806]),
    ([0.24644899368286133, 0.2572287619113922, 0.2565997540950775, 0.23347246646881104],
     [0.4701178967952728, 0.2965059280395508, 0.16483691334724426, 0.06853924691677094]),
    ([0.24885503947734833, 0.25273898243904114, 0.2565865218639374, 0.231194406747818],
     [0.4502357542514801, 0.29023152589797974, 0.17780274152755737, 0.0817299634218216]),
    ([0.24713042378425598, 0.25761404633522034, 0.24950221180915833, 0.2311907410621643],
     [0.43305790424346924, 0.29356253147125244, 0.1849091351032257, 0.08847037702798843]),
    ([0.2524174749851227, 0.26481351256370544, 0.23969635367393494, 0.22470316290855408],
     [0.41875216364860535, 0.2950814664363861, 0.18600966036319733, 0.10015662014484406]),
]
#: official ``Lx`` (already divided by scale_ratio 2.4) and ``Lu`` of the 12 steps
REF_LX = [
    0.8056160807609558, 2.0694994926452637, 2.2106151580810547, 0.7479643821716309,
    1.3159852027893066, 0.6785159707069397, 0.768450140953064, 1.1104073524475098,
    0.7053335309028625, 1.5668808221817017, 1.648706316947937, 0.9789695143699646,
]
REF_LU = [
    0.4385513365268707, 0.23840132355690002, 0.422486275434494, 0.48400190472602844,
    0.9068261384963989, 0.7638786435127258, 0.48333409428596497, 0.4147340953350067,
    0.43619561195373535, 0.2745589315891266, 0.27473917603492737, 0.6699438691139221,
]


def _batches():
    """The seeded batches of the reference run: ((x_w, x_s), y), (u_w, u_s, u_s1) per step,
    the inputs being the logits."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS * EPOCHS):
        y = torch.randint(0, K, (B,), generator=g)
        xw = torch.randn(B, K, generator=g) * 2
        xs = torch.randn(B, K, generator=g) * 2
        base = torch.randn(B * MU, K, generator=g) * 3
        uw = base + torch.randn(B * MU, K, generator=g) * 0.5
        us = base + torch.randn(B * MU, K, generator=g)
        us1 = base + torch.randn(B * MU, K, generator=g)
        out.append((xw, xs, y, uw, us, us1))
    return out


class IdentityNet(nn.Module):
    """Logits = inputs (features too), as the reference run's network."""

    def forward(self, x):
        return ModelOutput(x, x)


def _algorithm() -> SimPro:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(LABELED_COUNTS)])
    cfg = SimProConfig(uratio=MU, threshold=0.6, prior_tau=2.0, prior_momentum=0.9,
                       epoch_iters=STEPS)
    algo = SimPro(cfg, K, K, labels)
    algo.observe_unlabeled_size(NUM_UNLABELED)
    return algo


def test_losses_and_priors_over_four_epochs_equal_the_official_run():
    algo, net = _algorithm(), IdentityNet()
    masks = []
    for step, (xw, xs, y, uw, us, us1) in enumerate(_batches()):
        batch = Batch(x_lb=xw, y_lb=y, idx_lb=torch.arange(B), x_ulb=[uw, us, us1],
                      idx_ulb=torch.arange(B * MU), x_lb_views=[xs])
        loss, logs = algo.step(batch, StepState(step, STEPS * EPOCHS, net, net))
        pi_u, pi = REF_PRIORS[step // STEPS]  # the priors this epoch trains with
        assert torch.allclose(algo.unlabeled_prior, torch.tensor(pi_u), atol=1e-6), step
        assert torch.allclose(algo.train_prior, torch.tensor(pi), atol=1e-6), step
        assert float(logs["loss/labeled"]) == pytest.approx(REF_LX[step], abs=1e-5), step
        assert float(logs["loss/unlabeled"]) == pytest.approx(REF_LU[step], abs=1e-5), step
        assert float(loss) == pytest.approx(REF_LX[step] + REF_LU[step], abs=1e-5)
        masks.append(float(logs["mask/ratio"]))
    assert any(0 < m < 1 for m in masks)  # the threshold keeps some targets and drops others
    algo.start_epoch(STEPS * EPOCHS)  # the last epoch's M-step
    pi_u, pi = REF_PRIORS[-1]
    assert torch.allclose(algo.unlabeled_prior, torch.tensor(pi_u), atol=1e-6)
    assert torch.allclose(algo.train_prior, torch.tensor(pi), atol=1e-6)


def test_the_m_step_keeps_the_official_plus_one():
    """``S / (sum S + 1)``: the official unlabeled estimate is not normalised to 1."""
    pi_u, pi = updated_priors(torch.full((2,), 0.5), torch.tensor([0.8, 0.2]),
                              torch.tensor([3.0, 1.0]), torch.tensor([6.0, 2.0]), 0.5)
    assert torch.allclose(pi_u, torch.tensor([0.25 + 0.5 * 3 / 5, 0.25 + 0.5 * 1 / 5]))
    assert torch.allclose(pi, torch.tensor([0.4 + 0.5 * 9 / 12, 0.1 + 0.5 * 3 / 12]))
