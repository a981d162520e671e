"""examples/fixmatch_daso.py (DASO in a FixMatch loop of the usual shape) runs, and a run
stopped at a checkpoint and resumed ends bit for bit where the uninterrupted run ends:
DASO's queues, m_hat, window and step count, the network, its EMA copy."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).parents[2] / "examples" / "fixmatch_daso.py"
SMALL = dict(batch_size=8, mu=2, warmup_iters=4, dist_window=3, threshold=0.5)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("fixmatch_daso_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_interleave_round_trip(example):
    x = torch.arange(30).reshape(15, 2)
    mixed = example.interleave(x, 5)
    assert not torch.equal(mixed, x)
    assert torch.equal(example.de_interleave(mixed, 5), x)


def test_resume_continues_exactly(example, tmp_path):
    straight = example.train(10, tmp_path / "a.pt", **SMALL)
    example.train(6, tmp_path / "b.pt", **SMALL)
    resumed = example.train(10, tmp_path / "b.pt", resume=True, **SMALL)
    (model_a, ema_a, daso_a), (model_b, ema_b, daso_b) = straight, resumed
    state_a, state_b = daso_a.state_dict(), daso_b.state_dict()
    assert set(state_a) >= {"queue", "queue_len", "queue_ptr", "m_hat", "window_counts",
                            "num_observed"}
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for a, b in ((model_a, model_b), (ema_a.ema, ema_b.ema)):
        for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), key
    # DASO did its work: 10 steps counted, active after 4, m_hat moved, queues filled
    assert daso_b.num_observed.item() == 10 and daso_b.active()
    assert not torch.equal(daso_b.m_hat, torch.full((10,), 0.1))
    assert daso_b.queue_len.sum().item() == 10 * 8  # 80 labeled features, no queue full
    # the resumed half really started from the checkpoint, not from scratch
    fresh = example.train(4, None, **SMALL)[2]
    assert not torch.equal(fresh.queue, daso_b.queue)


def test_command_line(example, tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    example.main(["--steps", "3", "--checkpoint", str(ckpt)])
    example.main(["--steps", "5", "--checkpoint", str(ckpt), "--resume"])
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    out = capsys.readouterr().out
    assert out.count("EMA balanced accuracy on held-out digits:") == 2
