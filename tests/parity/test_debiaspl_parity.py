"""DebiasPL parity: imbssl's debiased pseudo-labels, q_hat and adaptive margin loss equal the
official code's on fixed seeded logits over five steps (q_hat carries over).

Reference values: computed once by running ``causal_inference`` and ``update_qhat`` of
``main_DebiasPL.py`` and the non-multiview branch of its ``train`` (pseudo-label, mask,
q_hat update, adaptive marginal loss) from github.com/frank-xwang/debiased-pseudo-labeling
(commit 3d68ccb52e73627252d6d761501dbe9185f50a39), num_classes 4, tau 0.4, momentum 0.9 (so
five steps move q_hat visibly), threshold 0.6, on CPU.
"""
from __future__ import annotations

import torch

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.debiaspl import debiased_probs, margin_loss, updated_qhat
from imbssl.algorithms.fixmatch import fixmatch_mask

K, TAU, M, THR = 4, 0.4, 0.9, 0.6
REF_QHAT = [
    [0.28764525055885315, 0.23516444861888885, 0.24686090648174286, 0.23032936453819275],
    [0.3306610882282257, 0.22627738118171692, 0.22916719317436218, 0.2138942927122116],
    [0.3734954297542572, 0.20416079461574554, 0.22691799700260162, 0.19542571902275085],
    [0.39841681718826294, 0.19765585660934448, 0.22292500734329224, 0.18100225925445557],
    [0.4316268861293793, 0.18203328549861908, 0.21220465004444122, 0.17413511872291565],
]
REF_LOSS_U = [0.7809820771217346, 0.8580081462860107, 1.239029049873352, 1.1675571203231812, 1.263795256614685]
REF_TARGETS = [[0, 0, 0, 0, 2, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], [3, 0, 0, 0, 0, 0]]
REF_MASK = [[0.0, 1.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]]


def _steps():
    """The reference run's five (weak, strong) logits."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(5):
        weak = torch.randn(6, K, generator=g) * 2
        weak[:, 0] += 2.0
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
