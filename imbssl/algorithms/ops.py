"""Small tensor operations shared by the SSL algorithms (no host synchronisation)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def fp32(t: Tensor):
    """Context that turns autocast off on ``t``'s device (float32 matmuls for small targets)."""
    return torch.autocast(t.device.type, enabled=False)


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T)  (MixMatch Eq. 7)."""
    pt = p.pow(1.0 / temperature)
    return pt / pt.sum(dim=-1, keepdim=True)


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Float one-hot without ``F.one_hot``'s range check (which syncs the host on CUDA)."""
    return (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).float()


def mixup_lambda(alpha: float, device: torch.device | str) -> Tensor:
    """lambda ~ Beta(alpha, alpha) (MixMatch Eq. 8), lambda' = max(lambda, 1 - lambda) (Eq. 9).

    Sampled on ``device`` as g1 / (g1 + g2) with g ~ Gamma(alpha, 1): torch RNG, no host sync.
    """
    conc = torch.full((2,), float(alpha), device=device)
    g = torch._standard_gamma(conc)
    lam = g[0] / g.sum()
    return torch.maximum(lam, 1.0 - lam)


def mixup(x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """MixUp of the rows of (x, y) with a random permutation of themselves (MixMatch Eqs. 8-11).

    Returns (mixed x, mixed y, lambda').
    """
    lam = mixup_lambda(alpha, x.device)
    perm = torch.randperm(x.size(0), device=x.device)
    lam_x = lam.to(x.dtype)
    return lam_x * x + (1 - lam_x) * x[perm], lam * y + (1 - lam) * y[perm], lam


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row H(targets, softmax(logits)) in float32."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def rotate_batch(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate image i of ``x`` (N, C, H, W) by 90 * rotations[i] degrees (counter-clockwise,
    ``torch.rot90`` on (H, W)); no Python loop over images."""
    if x.size(-1) != x.size(-2):
        raise ValueError("rotation self-supervision needs square images")
    stacked = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])  # (4, N, C, H, W)
    return stacked[rotations, torch.arange(x.size(0), device=x.device)]


def linear_rampup(step: int, total_steps: int, ratio: float) -> float:
    """min(step / (ratio * total_steps), 1): the consistency weight's linear ramp-up (host ints)."""
    length = ratio * total_steps
    return 1.0 if length <= 0 else min(step / length, 1.0)


def aligned_refined_probs(probs: Tensor, feats_w: Tensor, step: int, refiner,
                          dist_align=None) -> Tensor:
    """Weak-view probabilities -> optional distribution alignment (ReMixMatch / DASO)
    -> the refiner (DASO blend on the detached features). Call under ``torch.no_grad()``."""
    if dist_align is not None:
        probs = dist_align(probs)
    return refiner.refine(probs, feats_w.detach(), step)


def weak_view_probs(logits_w: Tensor, feats_w: Tensor, step: int, refiner,
                    dist_align=None) -> tuple[Tensor, Tensor]:
    """(q_b aligned and refined, argmax of the raw q_b) with q_b = p_m(y | alpha(u_b)) the
    softmax of the detached float32 weak-view logits. Call under ``torch.no_grad()``."""
    probs = torch.softmax(logits_w.detach().float(), dim=-1)  # q_b = p_m(y | alpha(u_b))
    linear = probs.argmax(dim=-1)
    return aligned_refined_probs(probs, feats_w, step, refiner, dist_align), linear
