"""DebiasPL parity: imbssl's debiased pseudo-labels, q_hat and adaptive margin loss equal the
official code's on fixed seeded logits over five steps (q_hat carries over).

Reference values: computed once by running ``causal_inference`` and ``update_qhat`` of
``main_DebiasPL.py`` and the non-multiview branch of its ``train`` (pseudo-label, mask,
q_hat update, adaptive marginal loss) from github.com/frank-xwang/debiased-pseudo-labeling
(commit 3d68ccb52e73627252d6d761501dbe9185f50a39), num_classes 4, tau 0.4, momentum 0.5 (so
five steps move q_hat far from uniform), threshold 0.5, on CPU. Without the debiasing, 6 of
the 30 masks and one label would differ.
"""
from __future__ import annotations

import torch

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.debiaspl import debiased_probs, margin_loss, updated_qhat
from imbssl.algorithms.fixmatch import fixmatch_mask

K, TAU, M, THR = 4, 0.4, 0.5, 0.5
REF_QHAT = [
    [0.4325481653213501, 0.1904778778553009, 0.21378883719444275, 0.16318511962890625],
    [0.5377795696258545, 0.1653597056865692, 0.1619364619255066, 0.1349242776632309],
    [0.6170284748077393, 0.09818847477436066, 0.17879721522331238, 0.10598587989807129],
    [0.6211287975311279, 0.10850699245929718, 0.17031054198741913, 0.10005372762680054],
    [0.6521131992340088, 0.09397464990615845, 0.15399950742721558, 0.09991271793842316],
]
REF_LOSS_U = [1.774412751197815, 0.7062594294548035, 0.9978297352790833, 0.9655945301055908, 0.8333795070648193]
REF_TARGETS = [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], [3, 0, 0, 0, 0, 0]]
REF_MASK = [[0.0, 1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def _steps():
    """The reference run's five (weak, strong) logits."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(5):
        weak = torch.randn(6, K, generator=g)
        weak[:, 0] += 1.5
        out.append((weak, torch.randn(6, K, generator=g)))
    return out


def test_five_steps_equal_the_official_functions():
    qhat = torch.full((K,), 1.0 / K)
    for i, (weak, strong) in enumerate(_steps()):
        mask, pseudo = fixmatch_mask(debiased_probs(weak, qhat, TAU), THR)
        qhat = updated_qhat(qhat, torch.softmax(weak, dim=-1), M)
        loss = margin_loss(strong, pseudo, mask, qhat, TAU)
        assert pseudo.tolist() == REF_TARGETS[i] and mask.tolist() == REF_MASK[i]
        assert torch.allclose(qhat, torch.tensor(REF_QHAT[i]), atol=1e-6)
        assert abs(float(loss) - REF_LOSS_U[i]) < 1e-6


class _Logits(torch.nn.Module):
    """A "network" whose output for the concatenated batch is a given logits tensor."""

    def __init__(self):
        super().__init__()
        self.logits = None

    def forward(self, x):
        from imbssl.models.base import ModelOutput

        return ModelOutput(self.logits, torch.zeros(len(self.logits), 2))


def test_algorithm_step_reproduces_the_official_qhat_and_loss():
    """The algorithm's own step (q_hat buffer) over the five steps; the labeled logits are
    zeros (loss log K), so the unlabeled loss is the step's loss minus log K."""
    from imbssl.algorithms import Batch, StepState

    cls = get_algorithm("debiaspl")
    algo = cls(cls.Config(debias_tau=TAU, qhat_momentum=M, threshold=THR, uratio=3), K, 2,
               torch.tensor([0, 1, 2, 3]))
    net = _Logits()
    for i, (weak, strong) in enumerate(_steps()):
        net.logits = torch.cat([torch.zeros(2, K), weak, strong])
        batch = Batch(torch.zeros(2, 1), torch.tensor([0, 1]), torch.tensor([0, 1]),
                      [torch.zeros(6, 1), torch.zeros(6, 1)], torch.arange(6))
        loss, logs = algo.step(batch, StepState(i, 5, net, net))
        assert torch.allclose(algo.qhat, torch.tensor(REF_QHAT[i]), atol=1e-6)
        assert abs(float(logs["loss/unlabeled"]) - REF_LOSS_U[i]) < 1e-6
        assert logs["pseudo/final"].tolist() == REF_TARGETS[i]
