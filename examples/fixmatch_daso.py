"""FixMatch + DASO in a FixMatch loop of the usual shape (as in kekmodel/FixMatch-pytorch): a
network that returns logits only, interleaved batches, an EMA class that deep-copies the
network and a checkpoint dict. imbssl supplies DASO, ``FeatureTap`` and the long-tailed split;
everything else is the user's code.

    python examples/fixmatch_daso.py --steps 300 --checkpoint /tmp/fixmatch_daso.pt
    python examples/fixmatch_daso.py --steps 600 --checkpoint /tmp/fixmatch_daso.pt --resume

Data: scikit-learn's 8x8 digits made long-tailed with ``make_longtail_split`` (30 -> 3 labeled
and 90 -> 9 unlabeled images per class, as imbssl's quickstart). DASO's warm-up and window are
imbssl's short-run setting (``pseudo=daso_quick``: 100 and 20); the rest are paper defaults.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imbssl.data import make_longtail_split
from imbssl.pseudo import DASO, FeatureTap


class Net(nn.Module):
    """A small MLP with batch norm that returns logits only, like most FixMatch networks."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


class ModelEMA:
    """An EMA copy of the network (deep copy, eval mode), as FixMatch code usually has it.
    Decay 0.99 for a run of hundreds of steps: 0.999 would keep ~55% of the initial weights
    after 600 steps, and DASO's queues would hold the features of a barely trained network."""

    def __init__(self, model: nn.Module, decay: float = 0.99):
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for p_ema, p in zip(self.ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1.0 - self.decay)
        for b_ema, b in zip(self.ema.buffers(), model.buffers()):
            b_ema.copy_(b)


def interleave(x: torch.Tensor, size: int) -> torch.Tensor:
    """Reorder a concatenated batch so each slice holds a share of every part (for batch norm)."""
    s = list(x.shape)
    return x.reshape([-1, size] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])


def de_interleave(x: torch.Tensor, size: int) -> torch.Tensor:
    """Undo ``interleave``: logits *and* features go back to [labeled, weak, strong] order."""
    s = list(x.shape)
    return x.reshape([size, -1] + s[1:]).transpose(0, 1).reshape([-1] + s[1:])


def load_digits_lt(seed: int = 0):
    """Digits as (N, 1, 8, 8) floats in [0, 1], labels, and the labeled/unlabeled indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    split = make_longtail_split(digits.target, n1=30, gamma_l=10, m1=90, gamma_u=10, seed=seed)
    return x, y, torch.from_numpy(split.labeled), torch.from_numpy(split.unlabeled)


def weak_aug(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random shift of up to one pixel (one per batch, padding with zeros)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(F.pad(x, (1, 1, 1, 1)), shifts=(dy, dx), dims=(2, 3))[..., 1:-1, 1:-1]


def strong_aug(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The weak shift, pixel noise and a random 3x3 cutout per image."""
    x = weak_aug(x, gen) + 0.3 * torch.randn(x.shape, generator=gen)
    corner = torch.randint(0, 6, (len(x), 2), generator=gen)
    rows = torch.arange(8)
    keep_r = (rows[None] < corner[:, :1]) | (rows[None] >= corner[:, :1] + 3)
    keep_c = (rows[None] < corner[:, 1:]) | (rows[None] >= corner[:, 1:] + 3)
    return x * (keep_r[:, :, None] | keep_c[:, None, :]).unsqueeze(1)


def train(steps: int, checkpoint: Path | None = None, resume: bool = False, *,
          batch_size: int = 32, mu: int = 2, threshold: float = 0.95, lr: float = 0.03,
          warmup_iters: int = 100, dist_window: int = 20, seed: int = 0, log_every: int = 0):
    """Train to ``steps`` (from the checkpoint when ``resume``); returns (model, ema, daso)."""
    x, y, labeled, unlabeled = load_digits_lt(seed)
    torch.manual_seed(seed)
    model = Net()
    ema = ModelEMA(model)
    # DASO needs the classifier's input: tap both networks (safe with the deep copy above)
    tap, ema_tap = FeatureTap(model.fc), FeatureTap(ema.ema.fc)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    daso = DASO(10, model.fc.in_features, queue_size=256, proto_temperature=0.05,
                dist_temperature=1.5, warmup_iters=warmup_iters, dist_window=dist_window,
                align_weight=1.0)
    start = 0
    if resume:
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        ema.ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        daso.load_state_dict(state["daso"])  # queues, m_hat, window and DASO's step count
        start = state["step"]

    parts = 2 * mu + 1
    for step in range(start, steps):
        model.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # per step: exact resume
        i_l = labeled[torch.randint(len(labeled), (batch_size,), generator=gen)]
        i_u = unlabeled[torch.randint(len(unlabeled), (batch_size * mu,), generator=gen)]
        x_l, y_l = weak_aug(x[i_l], gen), y[i_l]
        x_w, x_s = weak_aug(x[i_u], gen), strong_aug(x[i_u], gen)
        active = daso.active()  # from DASO's own checkpointed count; before observe()

        with torch.no_grad():  # 1. the EMA network's labeled features feed DASO's queues
            ema.ema(x_l)
            daso.enqueue(ema_tap.features, y_l)

        inputs = interleave(torch.cat([x_l, x_w, x_s]), parts)
        logits = de_interleave(model(inputs), parts)
        feats = de_interleave(tap.features, parts)  # de-interleave the features like the logits
        logits_l = logits[:batch_size]
        logits_w, logits_s = logits[batch_size:].chunk(2)
        feats_w, feats_s = feats[batch_size:].chunk(2)

        with torch.no_grad():  # 2. pseudo-labels: blended after the warm-up, then thresholded
            probs = logits_w.softmax(dim=-1)
            if active:
                probs = daso.blend(probs, daso.semantic_probs(feats_w))
            max_probs, targets_u = probs.max(dim=-1)
            mask = max_probs.ge(threshold).float()
            daso.observe(targets_u)  # every final hard label

        loss_x = F.cross_entropy(logits_l, y_l)
        loss_u = (F.cross_entropy(logits_s, targets_u, reduction="none") * mask).mean()
        loss = loss_x + loss_u
        if active:  # 3. semantic alignment loss, weighted by DASO's align_weight
            loss = loss + daso.alignment_loss(feats_w, feats_s)

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} mask {mask.mean().item():.2f} "
                  f"active {active} m_hat {[round(v, 2) for v in daso.m_hat.tolist()]}")

    if checkpoint is not None:
        torch.save({"step": steps, "model": model.state_dict(), "ema": ema.ema.state_dict(),
                    "optimizer": optimizer.state_dict(), "daso": daso.state_dict()}, checkpoint)
    return model, ema, daso


@torch.no_grad()
def balanced_accuracy(model: nn.Module, seed: int = 0) -> float:
    """Mean per-class recall on the digits outside the labeled and unlabeled sets."""
    x, y, labeled, unlabeled = load_digits_lt(seed)
    held_out = torch.ones(len(y), dtype=torch.bool)
    held_out[labeled] = False
    held_out[unlabeled] = False
    pred = model.eval()(x[held_out]).argmax(-1)
    truth = y[held_out]
    return sum((pred[truth == c] == c).float().mean().item() for c in range(10)) / 10


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = p.parse_args(argv)
    if args.resume and args.checkpoint is None:
        p.error("--resume needs --checkpoint")
    _, ema, _ = train(args.steps, args.checkpoint, args.resume, log_every=50)
    print(f"EMA balanced accuracy on held-out digits: {balanced_accuracy(ema.ema):.3f}")


if __name__ == "__main__":
    main()
