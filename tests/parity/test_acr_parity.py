"""Parity with the official ACR code (github.com/Gank0078/ACR, train.py at commit
9a8f421ef7508c1e1e13cbae4ca36d442d89e322): the adaptive tau over a simulated epoch sequence,
and one training step's four losses (below).

Reference values: the official estimator lines of ``train.py`` (the epoch-start block
``if epoch > args.est_epoch: ... tau = args.taumin + (args.taumax - args.taumin) * KL_softmax``
and the per-step block ``now_mask[targets_u_b] += mask_l*mask_b ... count_KL[2] += KL_rev``)
were executed once, unmodified, on the prediction/confidence sequence that ``sequence`` below
draws (K = 10, labeled counts 1500 * 100^(-k/9), est_epoch 1, eval_step 6, batch 32, ema_u 0.99,
tau1 2, confidence rate 0.7, torch.Generator seed 0); the official code is not part of this
repository. ``tau`` is the value in force during each epoch (the official code keeps the
previous adjustment when the new tau is NaN).
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms.acr import ACR, ACRConfig, class_marks

K, EPOCHS, EVAL_STEP, EST_EPOCH, BATCH, CONF_RATE = 10, 8, 6, 1, 32, 0.7
COUNTS = [round(1500 * 100 ** (-k / 9)) for k in range(K)]

#: official train.py: tau per epoch and args.u_py after the last step
REFERENCE = {
    "consistent": ([2.0, 2.0, 0.6666667, 0.7988694, 0.7741207, 0.7490696, 0.7259568, 0.6987745],
                   [0.1150622, 0.1131877, 0.1174463, 0.1201266, 0.1122855, 0.0963643, 0.0819549,
                    0.0926437, 0.0756889, 0.0752398]),
    "uniform": ([2.0, 2.0, 0.6666667, 0.8215518, 0.8290835, 0.8268734, 0.8208739, 0.8161744],
                [0.0958928, 0.0968689, 0.1021603, 0.1004452, 0.0972145, 0.1037667, 0.1081134,
                 0.0979111, 0.0988474, 0.0987798]),
    "reversed": ([2.0, 2.0, 0.6666667, 0.8290266, 0.8493882, 0.8786153, 0.9117683, 0.943325],
                 [0.0768621, 0.0803105, 0.0779673, 0.0860803, 0.1036851, 0.1136363, 0.1107606,
                  0.1199038, 0.1094366, 0.1213572]),
}


def labeled_prior() -> torch.Tensor:
    counts = torch.tensor(COUNTS, dtype=torch.float)
    return counts / counts.sum()


def sequence(name: str):
    """Per step: (balanced-head predictions, confidence marks) as the reference run drew them."""
    py = labeled_prior()
    dist = {"consistent": py, "uniform": torch.full((K,), 0.1), "reversed": py.flip(0)}[name]
    cdf = dist.cumsum(0)
    cdf = cdf / cdf[-1]
    g = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS * EVAL_STEP):
        preds = torch.searchsorted(cdf, torch.rand(BATCH, generator=g)).clamp_max(K - 1)
        conf = torch.rand(BATCH, generator=g) < CONF_RATE
        yield preds, conf


def make_acr() -> ACR:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    cfg = ACRConfig(epoch_iters=EVAL_STEP, estimate_after_epochs=EST_EPOCH,
                    estimate_momentum=0.99, tau_max=2.0)
    return ACR(cfg, K, 8, labels)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_tau_over_epochs_equals_official(name):
    algo = make_acr()
    taus = []
    for step, (preds, conf) in enumerate(sequence(name)):
        algo.start_epoch(step)
        if step % EVAL_STEP == 0:
            taus.append(float(algo.tau))
        if algo.estimating(step):
            algo.update_estimate(preds, conf)
    want_tau, want_u = REFERENCE[name]
    assert taus == pytest.approx(want_tau, abs=2e-6)
    assert algo.u_py.tolist() == pytest.approx(want_u, abs=2e-6)


def test_marks_are_one_per_class_not_counts():
    """The indexed add of the official code keeps the last image's mark per class."""
    preds = torch.tensor([0, 0, 0, 1, 1, 2])
    conf = torch.tensor([True, True, False, False, True, True])
    assert class_marks(preds, conf, 4).tolist() == [0.0, 1.0, 1.0, 0.0]
    official = torch.zeros(4)
    official[preds] += conf.float()  # the official statement itself (CPU)
    assert class_marks(preds, conf, 4).tolist() == official.tolist()
    assert class_marks(preds[:0], conf[:0], 4).tolist() == [0.0] * 4


#: official train.py lines 512-577 (labeled losses of both heads, the adjusted / raw / balanced
#: pseudo-labels and masks, Lu, Lu_b, their sum), executed once, unmodified, on the logits
#: ``step_inputs`` draws (K 4, batch 8, mu 2, labeled counts (40, 20, 10, 5), tau12 = tau2 = 2,
#: T 1, threshold 0.95), with the adaptive tau (``args.adjustment_l1``) at 2.0 and at 0.7;
#: shims: ``.cuda()`` returns the tensor, ``de_interleave`` is the identity (the logits are given
#: in batch order).
STEP_REFERENCE = {"2.0": {"Lx": 1.7663085460662842, "Lx_b": 3.8843278884887695, "Lu": 0.751875102519989, "Lu_b": 1.9257221221923828, "loss": 8.32823371887207}, "0.7": {"Lx": 1.7663085460662842, "Lx_b": 3.8843278884887695, "Lu": 0.25924697518348694, "Lu_b": 1.9257221221923828, "loss": 7.835605621337891}}


def step_inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8 + 3 * 2 * 8, 4, generator=g) * 3
    logits_b = torch.randn(8 + 3 * 2 * 8, 4, generator=g) * 3
    return logits, logits_b, torch.randint(0, 4, (8,), generator=g)


@pytest.mark.parametrize("tau", ["2.0", "0.7"])
def test_step_losses_equal_official(tau):
    from torch import nn

    from imbssl.algorithms import Batch, StepState
    from imbssl.algorithms.acr import BALANCED_HEAD
    from imbssl.models.base import ModelOutput

    logits, logits_b, y = step_inputs()

    class Fixed(nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x):
            return self.out

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleDict({BALANCED_HEAD: Fixed(logits_b)})

        def forward(self, x):
            return ModelOutput(logits, torch.zeros(len(x), 1))

    counts = (40, 20, 10, 5)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    algo = ACR(ACRConfig(uratio=2), 4, 1, labels)
    algo.tau.fill_(float(tau))
    z = torch.zeros(16, 1)
    batch = Batch(x_lb=torch.zeros(8, 1), y_lb=y, idx_lb=torch.arange(8), x_ulb=[z, z, z],
                  idx_ulb=torch.arange(16))
    loss, logs = algo.step(batch, StepState(0, 100000, Net(), Net()))
    want = STEP_REFERENCE[tau]
    for mine, theirs in (("loss/labeled", "Lx"), ("loss/balanced_labeled", "Lx_b"),
                         ("loss/unlabeled", "Lu"), ("loss/balanced_unlabeled", "Lu_b")):
        assert float(logs[mine]) == pytest.approx(want[theirs], abs=1e-5), mine
    assert float(loss.detach()) == pytest.approx(want["loss"], abs=1e-5)
