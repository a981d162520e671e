"""TRAS parity: imbssl's adjustment, transfer scale, transfer loss, the student's labeled loss
and five whole training steps (two teacher-only, three with the student) equal the official
code's on fixed seeded tensors.

Reference values: computed once by running ``compute_adjustment``, the ``T_logit`` lines of
``main``, ``KL``, ``balanced_softmax_loss`` and ``train`` of ``train.py`` from
github.com/Stomach-ache/TRAS (commit c62ec019d82b381d7bebb46ba5cb51bf217240f1; README command
defaults: --A 2 --B 2 --tro_train 1.0, Adam lr 0.002, ema-decay 0.999, batch 64) on CPU, with
a stand-in for the official WideResNet of the same interface (``forward`` -> features,
``classify`` = ``fc``, ``classify2`` = ``fc2``): ``tanh(Linear(6, 5))`` and two linear heads,
4 classes, 192 labeled images (96/48/32/16), 64 unlabeled images a step with three views.
``train`` ran epoch 10 for two steps (teacher only) and epoch 11 for three (the student
trains: ``epoch > 10``), continuing the same model, Adam and ``WeightEMA`` (which also
multiplies every online weight by ``1 - 0.02 lr`` after each step; the harness below does
the same, as the trainer's recipe would).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.algorithms.tras import (
    STUDENT_HEAD,
    adjusted_labeled_loss,
    prior_adjustment,
    transfer_loss,
    transfer_scale,
    transferred_logits,
)
from imbssl.models.base import ModelOutput, Network

K, D, FEAT, B = 4, 6, 5, 64
COUNTS = [96, 48, 32, 16]
LR, EMA_DECAY = 0.002, 0.999  # official train.py --lr, --ema-decay defaults

# official compute_adjustment and T_logit (A = B = 2)
REF_ADJUSTMENT = [-0.6931471805579453, -1.3862943611158907, -1.791759469222055,
                  -2.484906649776]
REF_T_LOGIT = [2.166666666667722, 2.3333333333347777, 2.5000000000011666, 2.999999999996333]
# official KL (T = 1 and T = 2) and balanced_softmax_loss on the seeded tensors of _fixed()
REF_KL_T1, REF_KL_T2, REF_BSL = 1.510670286652368, 3.883086953723938, 3.0370092391967773
# official train(): per step Lx, Lu, loss (total); loss_x_S and loss_u_S of the student steps
REF_LX = [4.084868431091309, 3.7397727966308594, 4.050487518310547, 3.7200264930725098,
          3.6609914302825928]
REF_LU = [0.09980121999979019, 0.10358155518770218, 0.10397376865148544, 0.17261004447937012,
          0.11038397997617722]
REF_TOTAL = [4.184669494628906, 3.8433544635772705, 7.5643817063592795, 6.868899919016368,
             8.094982741713691]
REF_STUDENT_LABELED = [2.858856201171875, 2.6390950679779053, 3.6259403228759766]
REF_TRANSFER = [0.5510641213678242, 0.33716831348658216, 0.6976667627097843]
# fc2 (the student head) of the online and of the EMA network after the five steps
REF_FC2 = [-0.04357166215777397, -0.8681885004043579, 3.2851011753082275, -2.715743064880371,
           -0.15163588523864746, -0.07337938249111176, 1.9186530113220215, 0.704198956489563,
           -1.8368661403656006, -0.10689198970794678, -1.3971049785614014, 2.075921058654785,
           3.8369083404541016, -0.8101868629455566, 0.25275081396102905, 2.3337368965148926,
           1.8417609930038452, 2.774991035461426, 2.7438290119171143, 1.3241606950759888]
REF_EMA_FC2 = [-0.04051265865564346, -0.8743267059326172, 3.2917213439941406,
               -2.720327854156494, -0.14584121108055115, -0.06798394024372101,
               1.9250239133834839, 0.6983482837677002, -1.8429120779037476,
               -0.11237835884094238, -1.4030355215072632, 2.0733797550201416,
               3.8435511589050293, -0.8051018714904785, 0.24781577289104462, 2.3295767307281494,
               1.846737027168274, 2.7745933532714844, 2.750063180923462, 1.3192720413208008]
# the labeled batch of each step: official train() restarts the labeled loader every epoch
LABELED_BATCH = [0, 1, 0, 1, 2]


def _data():
    """Stand-in weights, labeled set and the five unlabeled batches (as the reference run)."""
    g = torch.Generator().manual_seed(0)
    w = {"body.weight": torch.randn(FEAT, D, generator=g) * 0.8,
         "body.bias": torch.randn(FEAT, generator=g) * 0.1,
         "fc.weight": torch.randn(K, FEAT, generator=g) * 2.0, "fc.bias": torch.zeros(K),
         "fc2.weight": torch.randn(K, FEAT, generator=g) * 2.0, "fc2.bias": torch.zeros(K)}
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(COUNTS)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    x_lb = torch.randn(len(labels), D, generator=g) * 2
    x_lb[:, :K] += 3.0 * nn.functional.one_hot(labels, K)
    y_u = torch.randint(0, K, (5, B), generator=g)
    base = torch.randn(5, B, D, generator=g) * 2
    base[..., :K] += 3.0 * nn.functional.one_hot(y_u, K)
    views = [base + 0.5 * torch.randn(5, B, D, generator=g) for _ in range(3)]
    return w, labels, x_lb, views


def _fixed():
    """Student logits, teacher logits, student labels and mask for the loss functions."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(10, K, generator=g) * 3
    teacher = torch.randn(10, K, generator=g) * 3
    labels = torch.randint(0, K, (10,), generator=g)
    mask = (torch.rand(10, generator=g) > 0.4).float()
    return student, teacher, labels, mask


class _Backbone(nn.Module):
    """The reference's stand-in network: features ``tanh(body(x))``, teacher ``fc``."""

    feat_dim, num_classes = FEAT, K

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(D, FEAT), nn.Linear(FEAT, K)

    def forward(self, x):
        feats = torch.tanh(self.body(x))
        return ModelOutput(self.fc(feats), feats)


def _network(w) -> Network:
    net = Network(_Backbone(), {STUDENT_HEAD: nn.Linear(FEAT, K)})
    net.backbone.load_state_dict({k: v for k, v in w.items() if not k.startswith("fc2")})
    net.heads[STUDENT_HEAD].load_state_dict({"weight": w["fc2.weight"], "bias": w["fc2.bias"]})
    return net


def _prior() -> torch.Tensor:
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    return counts / counts.sum()


def test_adjustment_and_transfer_scale_equal_the_official_ones():
    adjustment = prior_adjustment(_prior(), 1.0)
    assert torch.allclose(adjustment.double(), torch.tensor(REF_ADJUSTMENT, dtype=torch.float64), atol=1e-6)
    scale = transfer_scale(adjustment, 2.0, 2.0)
    assert torch.allclose(scale.double(), torch.tensor(REF_T_LOGIT, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(("temperature", "want"), [(1.0, REF_KL_T1), (2.0, REF_KL_T2)])
def test_transfer_loss_equals_the_official_kl(temperature, want):
    student, teacher, labels, mask = _fixed()
    adjustment = prior_adjustment(_prior(), 1.0)
    target = transferred_logits(teacher, labels, adjustment, transfer_scale(adjustment, 2, 2))
    loss = transfer_loss(student, target, mask, temperature)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    # USB's port takes the student's own logits as the target: a different loss
    assert float(transfer_loss(student, student, mask, temperature)) != pytest.approx(want,
                                                                                     rel=1e-2)


def test_student_labeled_loss_equals_the_official_balanced_softmax_loss():
    student, _, labels, _ = _fixed()
    loss = adjusted_labeled_loss(student, labels, prior_adjustment(_prior(), 1.0))
    assert float(loss) == pytest.approx(REF_BSL, rel=1e-6)


def _ema_and_decay(model: nn.Module, ema: nn.Module) -> None:
    """Official ``WeightEMA.step``: EMA of every weight, then the online weight times
    ``1 - 0.02 lr`` (the official recipe's weight decay)."""
    with torch.no_grad():
        for p, e in zip(model.state_dict().values(), ema.state_dict().values(), strict=True):
            e.mul_(EMA_DECAY).add_(p * (1 - EMA_DECAY))
            p.mul_(1 - 0.02 * LR)


def test_five_training_steps_equal_the_official_train():
    w, labels, x_lb, views = _data()
    cls = get_algorithm("tras")
    # epoch_iters 2, warm-up 0: steps 0-1 teacher only (official epoch 10), 2-4 with the student
    algo = cls(cls.Config(epoch_iters=2, warmup_epochs=0), K, FEAT, labels)
    model = _network(w).train()
    ema = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step, lb in enumerate(LABELED_BATCH):
        part = slice(lb * B, (lb + 1) * B)
        batch = Batch(x_lb[part], labels[part], torch.arange(B), [v[step] for v in views])
        loss, logs = algo.step(batch, StepState(step, 100, model, ema))
        assert float(logs["loss/labeled"]) == pytest.approx(REF_LX[step], rel=1e-5)
        assert float(logs["loss/unlabeled"]) == pytest.approx(REF_LU[step], rel=1e-5)
        assert float(loss.detach()) == pytest.approx(REF_TOTAL[step], rel=1e-5)
        student = step >= 2
        assert ("loss/transfer" in logs) == student
        if student:
            assert float(logs["loss/student_labeled"]) == pytest.approx(
                REF_STUDENT_LABELED[step - 2], rel=1e-5)
            assert float(logs["loss/transfer"]) == pytest.approx(REF_TRANSFER[step - 2],
                                                                 rel=1e-5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_and_decay(model, ema)
    head, ema_head = model.heads[STUDENT_HEAD], ema.heads[STUDENT_HEAD]
    assert torch.allclose(head.weight.flatten(), torch.tensor(REF_FC2), atol=1e-5)
    assert torch.allclose(ema_head.weight.flatten(), torch.tensor(REF_EMA_FC2), atol=1e-5)
    assert bool(algo.student_trained)
