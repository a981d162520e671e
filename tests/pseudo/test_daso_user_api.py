"""DASO's user API (issue 20) and its numeric parts from issue 21: input checks that name the
mistake, the constructor's weight in the user-facing loss, ``active()`` from DASO's own
checkpointed count, the fixed-weight blend, float32 similarities under bf16 autocast and the
split between the user API and the engine hooks."""
from __future__ import annotations

import math
import pydoc

import pytest
import torch

from imbssl.pseudo import FeatureTap
from imbssl.pseudo.daso import DASO, DASOEngineHooks

HOOKS = ("update_labeled", "refine", "extra_loss", "pseudo_logs")
USER_API = ("enqueue", "semantic_probs", "blend", "observe", "alignment_loss", "active")


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- input checks
def test_misshaped_features_are_refused_naming_feat_dim():
    d = DASO(4, feat_dim=16, queue_size=8)
    with pytest.raises(ValueError, match=r"feat_dim=16.*float32 tensor of shape \(4, 32\)"):
        d.enqueue(torch.randn(4, 32), torch.randint(4, (8,)))  # 4 x 32 == 8 x 16
    with pytest.raises(ValueError, match="feat_dim=16"):
        d.enqueue(torch.randn(8, 4, 4), torch.randint(4, (8,)))
    with pytest.raises(ValueError, match="feat_dim=16"):
        d.semantic_probs(torch.randn(5, 15))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(8,\)"):
        d.enqueue(torch.randn(8, 16), torch.randint(4, (7,)))
    with pytest.raises(ValueError, match="integer"):
        d.enqueue(torch.randn(8, 16), torch.randint(4, (8,)).float())
    with pytest.raises(ValueError, match=r"num_classes=4"):
        d.blend(torch.rand(3, 4), torch.rand(3, 5))
    assert d.queue_len.sum().item() == 0  # nothing was queued by the refused calls


def test_observe_refuses_probabilities_and_float_labels():
    d = DASO(3, 2, dist_window=1)
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    with pytest.raises(ValueError, match=r"pseudo_labels must be an integer tensor of shape "
                                         r"\(N,\).*float32 tensor of shape \(2, 3\)"):
        d.observe(probs)  # FixMatch code keeps the probabilities in `pseudo_label`
    with pytest.raises(ValueError, match="argmax"):
        d.observe(probs.max(dim=-1).values)  # float confidences
    with pytest.raises(ValueError, match="integer"):
        d.observe(torch.tensor([1.0, 2.0]))  # float labels
    assert d.num_observed.item() == 0 and d.window_counts.sum().item() == 0
    d.observe(torch.tensor([1, 2]))
    torch.testing.assert_close(d.m_hat, torch.tensor([0.0, 0.5, 0.5]))


# ---------------------------------------------------------------------------- weights
def test_constructor_weight_is_the_weight_of_the_user_loss():
    f_weak, f_strong = torch.randn(6, 4), torch.randn(6, 4)
    labeled, y = torch.randn(9, 4), torch.arange(9) % 3
    losses = {}
    for w in (1.0, 3.0):
        d = DASO(3, 4, warmup_iters=0, align_weight=w)
        d.enqueue(labeled, y)
        losses[w] = d.alignment_loss(f_weak, f_strong)
        hook, _ = d.extra_loss(f_weak, f_strong, step=0)
        assert torch.equal(hook, losses[w])  # the engine applies the same weight
    assert losses[1.0].item() > 0
    assert losses[3.0].item() == pytest.approx(3.0 * losses[1.0].item(), rel=1e-6)


def test_fixed_weight_blend_by_hand():
    d = DASO(3, 2, blend_mode="fixed", fixed_weight=0.3, dist_temperature=0.5)
    d.m_hat.copy_(torch.tensor([0.7, 0.2, 0.1]))  # ignored by the fixed mode
    p = t([0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8])
    q = t([0.1, 0.1, 0.8], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    expected = t([0.7 * 0.2 + 0.3 * 0.1, 0.7 * 0.7 + 0.3 * 0.1, 0.7 * 0.1 + 0.3 * 0.8],
                 [0.7 * 0.6, 0.7 * 0.3, 0.7 * 0.1 + 0.3],
                 [0.7 * 0.1 + 0.3, 0.7 * 0.1, 0.7 * 0.8])
    torch.testing.assert_close(d.blend(p, q), expected)
    assert d.blend_weights().tolist() == pytest.approx([0.3, 0.3, 0.3])
    # the distribution-aware mode on the same inputs differs (v = (1, 4/49, 1/49))
    d_dist = DASO(3, 2, dist_temperature=0.5)
    d_dist.m_hat.copy_(d.m_hat)
    assert not torch.allclose(d_dist.blend(p, q), expected)
    # the official default weight is 0.5 (INTERP_ALPHA)
    torch.testing.assert_close(DASO(3, 2, blend_mode="fixed").blend(p, q), (p + q) / 2)


def test_fixed_mode_from_the_config_group():
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.pseudo import build_refiner

    GlobalHydra.instance().clear()
    cfg = compose(["pseudo=daso", "pseudo.blend_mode=fixed", "pseudo.fixed_weight=0.25"])
    d = build_refiner(cfg.pseudo, num_classes=3, feat_dim=2)
    assert (d.blend_mode, d.fixed_weight) == ("fixed", 0.25)
    GlobalHydra.instance().clear()
    with pytest.raises(Exception, match="blend_mode"):
        build_refiner(compose(["pseudo=daso", "pseudo.blend_mode=fixd"]).pseudo, 3, 2)
    GlobalHydra.instance().clear()
    row = compose(["experiment=cifar10_lt_g100_n500_fixmatch_daso_fixedblend"])
    d = build_refiner(row.pseudo, num_classes=10, feat_dim=128)
    assert (d.blend_mode, d.fixed_weight, d.warmup_iters) == ("fixed", 0.5, 5000)
    GlobalHydra.instance().clear()
    paper = compose(["experiment=cifar10_lt_g100_n500_fixmatch_daso"])
    assert build_refiner(paper.pseudo, 10, 128).blend_mode == "distribution"


# ---------------------------------------------------------------------------- precision
def test_similarities_and_blend_are_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    d = DASO(10, 64, warmup_iters=0, proto_temperature=0.05)
    d.enqueue(torch.randn(200, 64, generator=gen), torch.arange(200) % 10)
    z = torch.randn(256, 64, generator=gen)
    p = torch.randn(256, 10, generator=gen).softmax(-1)
    reference = d.semantic_probs(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(z, z.t()).dtype == torch.bfloat16  # autocast is on
        q = d.semantic_probs(z)
        refined = d.blend(p.bfloat16(), q)
        hooked = d.refine(p, z, step=0)
    assert q.dtype == torch.float32 and refined.dtype == torch.float32
    assert hooked.dtype == torch.float32
    torch.testing.assert_close(q, reference, rtol=0, atol=0)
    # what autocast would have done: bf16 similarities differ from fp32 ones
    protos = torch.nn.functional.normalize(d.prototypes, dim=-1).bfloat16()
    bf16 = (torch.nn.functional.normalize(z, dim=-1).bfloat16() @ protos.t()) / 0.05
    assert not torch.equal(bf16.float().softmax(-1), reference)


# ---------------------------------------------------------------------------- active()
def test_active_without_step_follows_the_checkpointed_count():
    d = DASO(2, 2, warmup_iters=3, dist_window=2)
    seen = []
    for _ in range(2):
        seen.append(d.active())
        d.observe(torch.tensor([0, 1]))
    state = d.state_dict()
    resumed = DASO(2, 2, warmup_iters=3, dist_window=2)
    assert not resumed.active()               # a fresh DASO starts at step 0 ...
    resumed.load_state_dict(state)            # ... a resumed one where the checkpoint was
    for _ in range(3):
        seen.append(resumed.active())
        assert resumed.active() == resumed.active(int(resumed.num_observed))
        resumed.observe(torch.tensor([1, 1]))
    assert seen == [False, False, False, True, True]
    assert resumed.num_observed.item() == 5


# ---------------------------------------------------------------------------- API split
def test_help_separates_the_user_api_from_the_engine_hooks():
    own = vars(DASO)
    assert all(name in own for name in USER_API)
    assert not any(name in own for name in HOOKS)  # inherited from DASOEngineHooks
    for name in HOOKS:
        doc = getattr(DASOEngineHooks, name).__doc__
        assert doc and doc.startswith("Engine hook"), name
    for name in USER_API:
        assert getattr(DASO, name).__doc__, name
    text = pydoc.render_doc(DASO, renderer=pydoc.plaintext)
    assert "Methods inherited from DASOEngineHooks" in text
    assert "refiner hooks" not in text.split("Methods inherited from DASOEngineHooks")[1][:400]
    assert "engine hooks, not for user code" in " ".join(DASO.__doc__.split())


# ---------------------------------------------------------------------------- features
def test_feature_tap_survives_a_deepcopy_of_the_network():
    import copy

    from torch import nn

    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    tap = FeatureTap(net[2])
    ema = copy.deepcopy(net)                  # the EMA copy made *after* the tap
    for p in ema.parameters():
        p.data.mul_(-1.0)
    x = torch.randn(4, 3)
    net(x)
    online = tap.features
    ema(x)                                    # must not overwrite the online features
    assert tap.features is online
    torch.testing.assert_close(online, net[1](net[0](x)))
    assert not math.isclose(float(online.detach().sum()), float(ema[1](ema[0](x)).detach().sum()))
    tap.remove()
    net(torch.randn(2, 3))
    assert tap.features is online             # removed: no longer updated
