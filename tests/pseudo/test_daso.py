"""Golden-value tests of the DASO refiner (imbssl/pseudo/daso.py); every expected value is
computed by hand in the test."""
from __future__ import annotations

import copy
import math
import random
from collections import deque
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from imbssl.pseudo import build_refiner
from imbssl.pseudo.base import IdentityRefiner
from imbssl.pseudo.daso import DASO, DASOConfig

CONFIGS = Path(__file__).parents[2] / "configs" / "pseudo"


def make(**kw) -> DASO:
    args = dict(num_classes=2, feat_dim=2, queue_size=3, proto_temperature=0.05,
                dist_temperature=1.5, warmup_iters=0, dist_window=1)
    args.update(kw)
    return DASO(**args)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- queues
def test_fifo_order_and_size_cap_across_batches():
    d = make(queue_size=3)
    d.enqueue(t([1, 0], [2, 0]), torch.tensor([0, 0]))
    assert d.queue_len.tolist() == [2, 0]
    torch.testing.assert_close(d.class_queue(0), t([1, 0], [2, 0]))
    d.enqueue(t([3, 0], [9, 9], [4, 0]), torch.tensor([0, 1, 0]))  # 4 > 3 -> [1, 0] dropped
    assert d.queue_len.tolist() == [3, 1]
    torch.testing.assert_close(d.class_queue(0), t([2, 0], [3, 0], [4, 0]))
    torch.testing.assert_close(d.class_queue(1), t([9, 9]))
    d.enqueue(t([5, 0]), torch.tensor([0]))
    torch.testing.assert_close(d.class_queue(0), t([3, 0], [4, 0], [5, 0]))


def test_fifo_more_than_queue_size_in_one_batch():
    d = make(queue_size=3)
    d.enqueue(t([1, 0]), torch.tensor([0]))
    feats = t([10, 0], [0, 7], [20, 0], [30, 0], [40, 0], [50, 0])
    d.enqueue(feats, torch.tensor([0, 1, 0, 0, 0, 0]))  # five of class 0 in one batch
    assert d.queue_len.tolist() == [3, 1]
    torch.testing.assert_close(d.class_queue(0), t([30, 0], [40, 0], [50, 0]))
    torch.testing.assert_close(d.prototypes[0], t(40, 0))
    torch.testing.assert_close(d.class_queue(1), t([0, 7]))


def test_fifo_matches_reference_deques_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    k, q, dim = 4, 5, 3
    d = make(num_classes=k, feat_dim=dim, queue_size=q)
    ref = [deque(maxlen=q) for _ in range(k)]
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(0, 12)
        labels = torch.randint(k, (n,), generator=gen)
        feats = torch.randn(n, dim, generator=gen)
        d.enqueue(feats, labels)
        for f, y in zip(feats, labels.tolist()):
            ref[y].append(f)
        for c in range(k):
            expected = torch.stack(list(ref[c])) if ref[c] else torch.zeros(0, dim)
            torch.testing.assert_close(d.class_queue(c), expected, rtol=0, atol=0)
            mean = expected.mean(0) if len(expected) else torch.zeros(dim)
            torch.testing.assert_close(d.prototypes[c], mean)


def test_prototypes_mean_of_filled_slots_and_zero_when_empty():
    d = make(num_classes=3, queue_size=4)
    d.enqueue(t([2, 0], [4, 2]), torch.tensor([0, 0]))  # half-filled: mean of 2, not of 4
    torch.testing.assert_close(d.prototypes, t([3, 1], [0, 0], [0, 0]))
    # features are queued as they come (not L2-normalised), like the official FeatureQueue
    torch.testing.assert_close(d.class_queue(0), t([2, 0], [4, 2]))


# ---------------------------------------------------------------------------- semantic probs
def test_semantic_probs_orthogonal_prototypes():
    d = make(proto_temperature=0.05)
    d.enqueue(t([2, 0], [0, 5]), torch.tensor([0, 1]))  # prototypes e1 (norm 2), e2 (norm 5)
    z = t([1, math.sqrt(3)], [0, -3])                  # cos = (1/2, sqrt3/2) and (0, -1)
    a, b = 0.5 / 0.05, (math.sqrt(3) / 2) / 0.05
    q0 = math.exp(a) / (math.exp(a) + math.exp(b))
    c, e = 0.0, -1.0 / 0.05
    q1 = math.exp(c) / (math.exp(c) + math.exp(e))
    torch.testing.assert_close(d.semantic_probs(z), t([q0, 1 - q0], [q1, 1 - q1]))


def test_semantic_logit_of_empty_class_is_zero():
    d = make(num_classes=3, feat_dim=2, proto_temperature=0.5)
    d.enqueue(t([1, 0]), torch.tensor([0]))
    z = t([1, 1])  # cos with e1 = 1/sqrt2; zero prototypes -> cos 0
    logits = torch.tensor([(1 / math.sqrt(2)) / 0.5, 0.0, 0.0])
    torch.testing.assert_close(d.semantic_probs(z), logits.softmax(0)[None])


# ---------------------------------------------------------------------------- blending
def test_blend_weights_max_normalised():
    d = make(num_classes=3, dist_temperature=0.5)
    d.m_hat.copy_(torch.tensor([0.5, 0.3, 0.2]))
    # m^(1/0.5) = (0.25, 0.09, 0.04), divided by the max 0.25
    torch.testing.assert_close(d.blend_weights(), torch.tensor([1.0, 0.36, 0.16]))
    d = make(num_classes=3, dist_temperature=1.5)
    d.m_hat.copy_(torch.tensor([0.2, 0.5, 0.3]))
    v = [(m / 0.5) ** (1 / 1.5) for m in (0.2, 0.5, 0.3)]
    torch.testing.assert_close(d.blend_weights(), torch.tensor(v))
    assert d.blend_weights().max().item() == 1.0


def test_blend_uses_weight_of_linear_argmax():
    d = make(num_classes=3, dist_temperature=0.5)
    d.m_hat.copy_(torch.tensor([0.5, 0.3, 0.2]))  # v = (1, 0.36, 0.16)
    p = t([0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8])
    q = t([0.1, 0.1, 0.8], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    expected = t([0.64 * 0.2 + 0.36 * 0.1, 0.64 * 0.7 + 0.36 * 0.1, 0.64 * 0.1 + 0.36 * 0.8],
                 [0.0, 0.0, 1.0],
                 [0.84 * 0.1 + 0.16, 0.84 * 0.1, 0.84 * 0.8])
    out = d.blend(p, q)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(3))


def test_blend_off_and_zero_weights_return_linear_probs_exactly():
    p = torch.rand(5, 3).softmax(1)
    q = torch.rand(5, 3).softmax(1)
    d = make(num_classes=3, blend_mode="off")
    assert torch.equal(d.blend(p, q), p)
    assert torch.equal(d.blend_weights(), torch.zeros(3))
    d = make(num_classes=3)
    d.m_hat.copy_(torch.tensor([0.0, 0.0, 1.0]))
    p = t([0.5, 0.3, 0.2], [0.1, 0.6, 0.3])  # argmax classes 0, 1: weight 0
    assert torch.equal(d.blend(p, q[:2]), p)


def test_m_hat_window():
    d = make(num_classes=3, dist_window=3)
    uniform = torch.full((3,), 1 / 3)
    d.observe(torch.tensor([0, 0, 1]))
    d.observe(torch.tensor([0]))
    torch.testing.assert_close(d.m_hat, uniform)
    assert d.window_counts.tolist() == [3, 1, 0]
    d.observe(torch.tensor([2, 0, 0, 1]))        # 3rd call: (5, 2, 1) / 8
    torch.testing.assert_close(d.m_hat, torch.tensor([5 / 8, 2 / 8, 1 / 8]))
    assert d.window_counts.tolist() == [0, 0, 0]
    d.observe(torch.tensor([2]))
    d.observe(torch.tensor([2, 1]))
    torch.testing.assert_close(d.m_hat, torch.tensor([5 / 8, 2 / 8, 1 / 8]))
    d.observe(torch.tensor([2]))                 # 6th call: only calls 4-6 count
    torch.testing.assert_close(d.m_hat, torch.tensor([0.0, 1 / 4, 3 / 4]))
    assert d.num_observed.item() == 6


# ---------------------------------------------------------------------------- warm-up, hooks
def test_warmup_switch():
    d = make(warmup_iters=2)
    assert [d.active(s) for s in range(4)] == [False, False, True, True]
    assert make(warmup_iters=0).active(0)
    d.enqueue(t([1, 0], [0, 1]), torch.tensor([0, 1]))
    d.m_hat.copy_(torch.tensor([1.0, 0.0]))        # v = (1, 0): class-0 predictions -> q
    p = t([0.9, 0.1])
    z = t([0.0, 1.0])                              # semantically class 1
    f_strong = t([1.0, 0.0])
    assert d.refine(p, z, step=1) is p             # warm-up: untouched
    assert d.extra_loss(z, f_strong, step=1) == (None, {})
    q = d.semantic_probs(z)
    torch.testing.assert_close(d.refine(p, z, step=2), q)
    loss, logs = d.extra_loss(z, f_strong, step=2)
    torch.testing.assert_close(loss, d.alignment_loss(z, f_strong))
    assert set(logs) == {"loss/daso_align"}


def test_alignment_loss_value_and_gradient():
    d = make(proto_temperature=0.5)
    d.enqueue(t([1, 0], [0, 1]), torch.tensor([0, 1]))
    f_weak = t([1, 0], [1, 1]).requires_grad_()
    f_strong = t([0, 1], [1, 0]).requires_grad_()
    # weak: cos (1, 0) -> logits (2, 0); cos (1/s2, 1/s2) -> (s2, s2) -> (1/2, 1/2)
    w0 = math.exp(2) / (math.exp(2) + 1)
    target = [[w0, 1 - w0], [0.5, 0.5]]
    # strong: cos (0, 1) -> logits (0, 2); (1, 0) -> (2, 0)
    lse = math.log(math.exp(2) + 1)
    log_s = [[0 - lse, 2 - lse], [2 - lse, 0 - lse]]
    expected = -sum(target[i][j] * log_s[i][j] for i in range(2) for j in range(2)) / 2
    loss = d.alignment_loss(f_weak, f_strong)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert f_weak.grad is None                       # the weak target is a constant
    assert f_strong.grad is not None and f_strong.grad.abs().sum() > 0
    d2 = make(proto_temperature=0.5, align_weight=2.5)
    d2.load_state_dict(d.state_dict())
    # the constructor's weight is the weight of the user-facing loss and of the engine hook
    assert d2.alignment_loss(f_weak, f_strong).item() == pytest.approx(2.5 * expected, rel=1e-6)
    loss2, logs = d2.extra_loss(f_weak, f_strong, step=0)
    assert loss2.item() == pytest.approx(2.5 * expected, rel=1e-6)
    assert logs["loss/daso_align"].item() == pytest.approx(2.5 * expected, rel=1e-6)
    assert make(align_weight=0.0).extra_loss(f_weak, f_strong, step=10) == (None, {})


def test_refine_uses_current_batch_and_logs_semantic_labels():
    d = make(num_classes=2, warmup_iters=0)
    p = t([0.5, 0.5], [0.5, 0.5])
    d.refine(p, t([1, 0], [0, 1]), step=0)
    assert d.pseudo_logs()["pseudo/semantic"].tolist() == [-1, -1]  # no queue yet
    d.enqueue(t([1, 0], [0, 1]), torch.tensor([0, 1]))
    d.refine(p, t([1, 0], [0, 1]), step=0)
    assert d.pseudo_logs()["pseudo/semantic"].tolist() == [0, 1]
    d.refine(p, t([0, 1], [1, 0]), step=0)         # the labels of *this* batch
    assert d.pseudo_logs()["pseudo/semantic"].tolist() == [1, 0]
    assert d.last_linear.tolist() == [0, 0]


def test_refiner_contract():
    d = make()
    assert isinstance(d, IdentityRefiner) and d.needs_labeled_features
    d.update_labeled(t([1, 0]), torch.tensor([1]))
    assert d.queue_len.tolist() == [0, 1]


# ---------------------------------------------------------------------------- state / config
def _drive(d: DASO, gen: torch.Generator, steps: int, start: int) -> list[torch.Tensor]:
    outs = []
    for s in range(start, start + steps):
        d.update_labeled(torch.randn(6, 4, generator=gen), torch.randint(3, (6,), generator=gen))
        probs = torch.randn(8, 3, generator=gen).softmax(1)
        fw, fs = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
        refined = d.refine(probs, fw, s)
        d.observe(refined.argmax(1))
        loss, _ = d.extra_loss(fw, fs, s)
        outs += [refined, d.m_hat.clone(), loss if loss is not None else torch.zeros(())]
    return outs


def test_state_dict_round_trip_continues_identically():
    kw = dict(num_classes=3, feat_dim=4, queue_size=5, warmup_iters=3, dist_window=4)
    a = DASO(**kw)
    _drive(a, torch.Generator().manual_seed(0), steps=6, start=0)  # mid-window, queues full
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"queue", "queue_len", "queue_ptr", "m_hat", "window_counts",
                          "num_observed"}
    b = DASO(**kw)
    b.load_state_dict(state)
    out_a = _drive(a, torch.Generator().manual_seed(1), steps=7, start=6)
    out_b = _drive(b, torch.Generator().manual_seed(1), steps=7, start=6)
    for x, y in zip(out_a, out_b):
        assert torch.equal(x, y)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_to_dtype_moves_all_float_state():
    d = make().to(torch.float64)
    assert d.queue.dtype == torch.float64 and d.m_hat.dtype == torch.float64
    d.enqueue(t([1, 0]), torch.tensor([0]))
    assert d.semantic_probs(t([1, 0])).dtype == torch.float64


@pytest.mark.parametrize("kw, bad", [
    (dict(proto_temperature=0.0), "proto_temperature"),
    (dict(dist_temperature=-1.0), "dist_temperature"),
    (dict(queue_size=0), "queue_size"),
    (dict(warmup_iters=-1), "warmup_iters"),
    (dict(dist_window=0), "dist_window"),
    (dict(align_weight=-0.5), "align_weight"),
    (dict(blend_mode="dist"), "blend_mode"),
    (dict(fixed_weight=1.5), "fixed_weight"),
])
def test_invalid_arguments(kw, bad):
    with pytest.raises(ValueError, match=bad):
        make(**kw)


def test_from_config_and_yaml_defaults():
    from omegaconf import OmegaConf

    d = DASO.from_config(DASOConfig(), num_classes=10, feat_dim=128)
    assert (d.queue_size, d.proto_temperature, d.dist_temperature, d.warmup_iters,
            d.dist_window, d.align_weight, d.blend_mode, d.fixed_weight) == \
        (256, 0.05, 1.5, 5000, 100, 1.0, "distribution", 0.5)
    assert d.queue.shape == (10, 256, 128)
    yaml = OmegaConf.load(CONFIGS / "daso.yaml")
    assert list(yaml.pop("defaults")) == ["daso_schema", "_self_"]
    assert OmegaConf.to_container(yaml) == OmegaConf.to_container(OmegaConf.structured(DASOConfig))
    none = OmegaConf.load(CONFIGS / "none.yaml")
    assert list(none.pop("defaults")) == ["none_schema", "_self_"] and none.name == "none"
    cfg = OmegaConf.merge(OmegaConf.structured(DASOConfig), {"blend_mode": "off", "dist_window": 7})
    d = build_refiner(cfg, num_classes=3, feat_dim=2)
    assert isinstance(d, DASO) and d.blend_mode == "off" and d.dist_window == 7
    with pytest.raises(ValueError, match="named"):
        DASO.from_config(OmegaConf.create({"name": "none"}), 3, 2)


def test_hot_path_has_no_host_sync(monkeypatch):
    from omegaconf import OmegaConf

    # built as the engine builds it (check_inputs=False: the user API's value checks sync)
    d = build_refiner(OmegaConf.merge(OmegaConf.structured(DASOConfig),
                                      {"queue_size": 2, "warmup_iters": 0, "dist_window": 2}),
                      num_classes=3, feat_dim=4)
    assert isinstance(d, DASO) and not d.check_inputs

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the DASO hot path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for step in range(3):
        d.update_labeled(torch.randn(5, 4), torch.tensor([0, 1, 1, 1, 2]))
        refined = d.refine(torch.rand(6, 3).softmax(1), torch.randn(6, 4), step)
        d.observe(refined.argmax(1))
        d.extra_loss(torch.randn(6, 4), torch.randn(6, 4), step)
        d.pseudo_logs()


# ---------------------------------------------------------------------------- FixMatch step
class _TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3, feat_dim: int = 6):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, feat_dim), nn.ReLU())
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, x):
        f = self.encoder(x)
        return self.classifier(f), f


def _fixmatch_step(model, ema, refiner, x_lb, y_lb, x_w, x_s, step, tau=0.5):
    """A hand-written FixMatch step that uses the refiner hooks in the engine's order."""
    if refiner.needs_labeled_features:
        with torch.no_grad():
            refiner.update_labeled(ema(x_lb)[1], y_lb)
    logits, feats = model(torch.cat([x_lb, x_w, x_s]))
    n, m = len(x_lb), len(x_w)
    logits_lb, logits_w, logits_s = logits.split([n, m, m])
    _, f_w, f_s = feats.split([n, m, m])
    with torch.no_grad():
        probs = refiner.refine(logits_w.softmax(-1), f_w.detach(), step)
        conf, pl = probs.max(-1)               # threshold the refined confidence
        mask = (conf >= tau).float()
        refiner.observe(pl)
    loss_l = F.cross_entropy(logits_lb, y_lb)
    loss_u = (F.cross_entropy(logits_s, pl, reduction="none") * mask).mean()
    loss = loss_l + loss_u
    extra, _ = refiner.extra_loss(f_w, f_s, step)
    if extra is not None:
        loss = loss + extra
    return loss


def test_fixmatch_step_with_neutral_daso_equals_plain():
    torch.manual_seed(0)
    model = _TinyNet()
    ema = copy.deepcopy(model)
    neutral = DASO(3, 6, queue_size=4, warmup_iters=0, dist_window=1, align_weight=0.0,
                   blend_mode="off")
    live = DASO(3, 6, queue_size=4, warmup_iters=0, dist_window=1, dist_temperature=0.3)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x_lb, y_lb = torch.randn(6, 5, generator=gen), torch.randint(3, (6,), generator=gen)
        x_w = torch.randn(10, 5, generator=gen)
        x_s = x_w + 0.3 * torch.randn(10, 5, generator=gen)
        grads = []
        for refiner in (IdentityRefiner(), neutral):
            model.zero_grad()
            loss = _fixmatch_step(model, ema, refiner, x_lb, y_lb, x_w, x_s, step)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss_plain, g_plain), (loss_daso, g_daso) = grads
        assert torch.equal(loss_plain, loss_daso)
        assert all(torch.equal(a, b) for a, b in zip(g_plain, g_daso))
        loss_live = _fixmatch_step(model, ema, live, x_lb, y_lb, x_w, x_s, step)
    assert not torch.equal(loss_live, loss_plain)  # the test can tell DASO apart
