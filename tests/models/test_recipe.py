"""The official DASO recipe's switches (model, EMA, optimizer): each does what it says."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from imbssl.engine.config import OptimConfig
from imbssl.engine.evaluate import confusion_matrix
from imbssl.engine.trainer import build_optimizer
from imbssl.models import EMA, build_model
from imbssl.models.ema import ema_decay_at
from imbssl.models.wrn import BasicBlock, WideResNet


def _reference_widening_block(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """BN, LeakyReLU, conv, BN, LeakyReLU, conv + 1x1 shortcut on the raw input (official
    DASO lib/models/wrn.py ``residual`` without activate_before_residual), built by hand."""
    act = F.leaky_relu(F.batch_norm(x, None, None, block.bn1.weight, block.bn1.bias, True), 0.1)
    h = F.conv2d(act, block.conv1.weight, stride=block.conv1.stride, padding=1)
    h = F.leaky_relu(F.batch_norm(h, None, None, block.bn2.weight, block.bn2.bias, True), 0.1)
    h = F.conv2d(h, block.conv2.weight, padding=1)
    return F.conv2d(x, block.shortcut.weight, stride=block.shortcut.stride) + h


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen)


@pytest.mark.parametrize("stage", [1, 2])
def test_widening_block_equals_the_official_form(stage):
    torch.manual_seed(0)
    net = WideResNet(10, depth=16, width=2)
    _randomize_bn(net, torch.Generator().manual_seed(1))
    block = net.stages[stage][0]
    assert block.shortcut is not None and not block.activate_before_residual
    x = torch.randn(4, block.bn1.num_features, 8, 8)
    torch.testing.assert_close(block(x), _reference_widening_block(block, x))
    port = copy.deepcopy(block)
    port.residual = "port"
    assert (port(x) - block(x)).abs().max() > 1e-2  # the port form is a different function


@pytest.mark.parametrize("depth,width", [(16, 1), (28, 2)])
def test_every_batch_norm_gets_a_gradient(depth, width):
    torch.manual_seed(0)
    net = WideResNet(10, depth=depth, width=width)
    net(torch.randn(4, 3, 32, 32)).logits.square().sum().backward()
    bns = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 * 2 * (depth - 4) // 6 + 1
    for name, m in bns:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name


def test_port_residual_leaves_widening_bn1_without_gradient():
    torch.manual_seed(0)
    net = WideResNet(10, depth=16, width=1, residual="port")
    net(torch.randn(4, 3, 32, 32)).logits.square().sum().backward()
    assert net.stages[1][0].bn1.weight.grad is None  # the quirk the official form removes


@pytest.mark.parametrize("name", ["wrn16_1", "wrn28_2", "small_cnn"])
def test_bn_momentum_reaches_every_batch_norm(name):
    net = build_model(name, 10, 3, bn_momentum=0.37)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.37 for m in bns)


def test_wrn16_1_size():
    net = build_model("wrn16_1", 10, 3)
    assert sum(p.numel() for p in net.parameters()) == 175_066
    assert net.feat_dim == 64


def test_ema_warmup_follows_the_formula():
    # step 0: decay 0 (copy), step 1: 1/2, step 3: 3/4, capped at the configured decay
    assert [ema_decay_at(s, 0.9, True) for s in (0, 1, 3, 9, 50)] == [0.0, 0.5, 0.75, 0.9, 0.9]
    assert ema_decay_at(0, 0.9, False) == 0.9
    w = nn.Linear(1, 1, bias=False)
    w.weight.data.fill_(0.0)
    ema = EMA(w, decay=0.9, warmup=True)
    for step, value in enumerate([4.0, 8.0, 2.0]):
        w.weight.data.fill_(value)
        ema.update(w, step)
    # d = 0, 1/2, 2/3: 4 -> (4 + 8) / 2 = 6 -> 2/3 * 6 + 1/3 * 2 = 14/3
    assert ema.model.weight.item() == pytest.approx(14 / 3)


@pytest.mark.parametrize("mode,expected", [("average", 0.9 * 1.0 + 0.1 * 5.0), ("copy", 5.0)])
def test_ema_buffers_average_or_copy(mode, expected):
    bn = nn.BatchNorm1d(2)
    ema = EMA(bn, decay=0.9, buffers=mode)
    ema.model.running_mean.fill_(1.0)
    bn.running_mean.fill_(5.0)
    ema.update(bn, step=100)
    torch.testing.assert_close(ema.model.running_mean, torch.full((2,), expected))
    assert ema.model.num_batches_tracked == bn.num_batches_tracked  # integers are copied


def _batch_with_shifted_statistics():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 3 + 2


def test_ema_train_mode_features_use_batch_statistics():
    torch.manual_seed(0)
    net = build_model("wrn16_1", 10, 3)
    ema = EMA(net, decay=0.99, train_mode=True)
    assert ema.model.training
    x = _batch_with_shifted_statistics()
    reference = copy.deepcopy(ema.model).train()
    with torch.no_grad():
        feats = ema.model(x).features
        torch.testing.assert_close(feats, reference(x).features)
        eval_feats = copy.deepcopy(net).eval()(x).features
    assert (feats - eval_feats).abs().max() > 1e-2


def test_evaluation_runs_in_eval_mode_and_restores_train_mode():
    torch.manual_seed(0)
    ema = EMA(build_model("wrn16_1", 10, 3), decay=0.99, train_mode=True)
    seen = []
    ema.model.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    x = _batch_with_shifted_statistics()
    before = ema.model.backbone.bn.running_mean.clone()
    conf = confusion_matrix(ema.model, (x.clamp(0, 1) * 255).to(torch.uint8),
                            torch.zeros(16, dtype=torch.long), lambda v: v.float() / 255, 10, 8,
                            contextlib.nullcontext)
    assert conf.sum() == 16 and seen == [False, False] and ema.model.training
    torch.testing.assert_close(ema.model.backbone.bn.running_mean, before)


def test_ema_eval_mode_by_default():
    assert not EMA(nn.BatchNorm1d(2)).model.training


@pytest.mark.parametrize("scope,n_exempt", [("all", 0), ("no_bias_bn", None)])
def test_decay_scope(scope, n_exempt):
    net = build_model("wrn16_1", 10, 3)
    opt = build_optimizer(net, OptimConfig(decay_scope=scope), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = [p for p in net.parameters() if id(p) not in decayed]
    if n_exempt == 0:
        assert not exempt and len(decayed) == len(list(net.parameters()))
    else:  # every bias and BN parameter is exempt, every conv/linear weight decayed
        assert exempt and all(p.ndim == 1 for p in exempt)
        assert all(id(p) in decayed for p in net.parameters() if p.ndim > 1)


def test_daso_protocol_trainer_brings_the_official_recipe():
    from imbssl.cli import compose

    cfg = compose(["trainer=daso_protocol", "model=wrn28_2"])
    assert cfg.model.ema_train_mode and cfg.model.bn_momentum == 0.1
    assert cfg.trainer.precision == "fp32" and cfg.optim.decay_scope == "all"
    assert cfg.dataset.geometric_fill == 0
    port = compose(["trainer=daso_protocol", "recipe=fixmatch_port"])
    assert not port.model.ema_train_mode and port.model.bn_momentum == 0.001
    assert compose(["trainer=daso_protocol", "trainer.precision=bf16"]).trainer.precision == "bf16"
