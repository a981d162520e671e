"""CTAugment (ReMixMatch, Berthelot et al., ICLR 2020, Sec. 3.2.2), batched on the device.

Each transformation's magnitude range [0, 1] is split into bins (17; Posterize 8) with
weights, all 1 at the start. A strong view draws ``depth`` = 2 transformations per image,
uniformly; for each, a bin is drawn in proportion to its weight, skipping bins whose weight
(relative to the op's largest, official ``rate_to_p``) is below the threshold, and the
magnitude is uniform inside the bin; Cutout follows. The weights are learnt from *probes*:
labeled images under 2 transformations with uniform magnitudes; each probe's proximity
1 - |p - y|_1 / 2 between the model's prediction and its label updates the bins it used,
weight <- rho * weight + (1 - rho) * proximity, rho = 0.99 (paper; official
``update_rates``), one probe after another in batch order.

Ops and magnitude maps follow the official ``libml/ctaugment.py`` of
github.com/google-research/fixmatch (the same in google-research/remixmatch), with two
deliberate differences: Rescale is left out (its six PIL resampling filters have no exact
batched counterpart) and Translate moves int((2v - 1) * 0.3 * size) pixels, the paper's range
(the official code passes the fraction itself as a pixel offset). Geometric ops fill with the
Augmenter's ``geometric_fill`` (official: PIL's default, black).

Every random draw comes from the trainer's augmentation generator on the data's device (one
fixed number of draws per batch, no host sync); the weights are a buffer of an ``nn.Module``
the algorithm owns, so they are saved with the algorithm's state, and every process applies
the same all-gathered probe updates, so they stay equal across processes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import augment as A
from .augment import STRONG_VIEWS, Augmenter

CTA_OPS: tuple[str, ...] = (
    "autocontrast", "blur", "brightness", "color", "contrast", "cutout", "equalize", "invert",
    "identity", "posterize", "rotate", "sharpness", "shear_x", "shear_y", "smooth", "solarize",
    "translate_x", "translate_y",
)
CTA_INDEX = {name: i for i, name in enumerate(CTA_OPS)}
# Bins per op (official @register(17) / posterize @register(8)); identity has no magnitude:
# it gets one bin that is sampled but never updated.
NUM_BINS = {name: 8 if name == "posterize" else 1 if name == "identity" else 17
            for name in CTA_OPS}
MAX_BINS = 17
DECAY = 0.99      # rho (paper Sec. 3.2.2; official CTAugment(decay=0.99))
THRESHOLD = 0.8   # bins below it are not sampled (paper; the official code uses th=0.85)
DEPTH = 2         # transformations per image (paper; official depth=2)
CUTOUT_FILL = 127
# Per op: its row among the LUT candidates of apply_cta_ops (0: identity / not a LUT op).
_LUT_OPS = ("identity", "autocontrast", "brightness", "contrast", "equalize", "invert",
            "posterize", "solarize")
_BLEND_OPS = ("blur", "color", "sharpness", "smooth")
_WARP_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_BLUR_KERNEL = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1],
                [1, 1, 1, 1, 1]]  # PIL ImageFilter.BLUR, scale 16


# ----------------------------------------------------------------------------- single ops

def cta_magnitudes(op: Tensor, v: Tensor, height: int, width: int) -> Tensor:
    """Per-image magnitude of op[b] at v[b] in [0, 1] (official ctaugment.py maps)."""
    v = v.float()
    signed = 2.0 * v - 1.0
    table = {
        "brightness": 0.1 + 1.9 * v, "color": 0.1 + 1.9 * v,        # _enhance: 0.1 + 1.9 v
        "contrast": 0.1 + 1.9 * v, "sharpness": 0.1 + 1.9 * v,
        "cutout": 1.0 + torch.floor(v * min(height, width) * 0.499),  # 1 + int(v * size * 0.499)
        "posterize": 1.0 + torch.floor(v * 7.999),                  # bits: 1 + int(v * 7.999)
        "rotate": torch.round(signed * 45.0),                       # int(round((2v - 1) * 45))
        "shear_x": signed * 0.3, "shear_y": signed * 0.3,           # (2v - 1) * 0.3
        "solarize": torch.floor(v * 255.999),                       # int(v * 255.999)
        "translate_x": torch.trunc(signed * 0.3 * width),           # paper: +-30% of the size
        "translate_y": torch.trunc(signed * 0.3 * height),
    }
    stacked = torch.stack([table.get(name, v) for name in CTA_OPS])  # blends: alpha = v
    return stacked.gather(0, op.view(1, -1).long()).squeeze(0)


def _blur(xf: Tensor) -> Tensor:
    """PIL ImageFilter.BLUR (5x5 ring / 16, rounded), the 2-pixel border unchanged."""
    if min(xf.shape[2:]) < 5:
        return xf
    c = xf.shape[1]
    kernel = torch.tensor(_BLUR_KERNEL, dtype=xf.dtype, device=xf.device)
    ring = torch.nn.functional.conv2d(xf, kernel.expand(c, 1, 5, 5), groups=c)
    out = xf.clone()
    out[:, :, 2:-2, 2:-2] = torch.floor(ring / 16.0 + 0.5)
    return out


def _invert_lut(xf: Tensor) -> Tensor:
    """PIL ImageOps.invert: 255 - v; (1, 1, 256)."""
    return 255.0 - A._levels(xf)


def _blend_lut(lut: Tensor, alpha: Tensor, xf: Tensor) -> Tensor:
    """Image.blend(x, op(x), alpha) as a table: floor(v + alpha * (lut[v] - v))."""
    v = A._levels(xf)
    return torch.floor(v + alpha.view(-1, 1, 1) * (lut - v)).clamp(0.0, 255.0)


def _where_op(op: Tensor, name: str, mag: Tensor, neutral: float) -> Tensor:
    """mag where the image picked `name`, else the op's neutral magnitude."""
    return torch.where(op == CTA_INDEX[name], mag, torch.full_like(mag, neutral))


def apply_cta_ops(x: Tensor, op: Tensor, v: Tensor, fill: float = A.WARP_FILL,
                  cutout_centre: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Apply CTA_OPS[op[b]] at v[b] to every image b (one CTAugment slot), PIL semantics.

    Images in [0, 255] (uint8 or float); returns the input's dtype. ``cutout_centre`` =
    (row, col) per image for the Cutout op (default: the centre)."""
    xf = A._as_float(x)
    b, c, (h, w) = xf.shape[0], xf.shape[1], xf.shape[2:]
    op = op.long()
    mag = cta_magnitudes(op, v, h, w)
    alpha = v.float()
    idx, gray = A._flat_index(xf), A._gray(xf)
    # 1. Lookup tables (every candidate (B, C, 256), the image's own picked by its op).
    candidates = [A._levels(xf).expand(b, c, 256),
                  _blend_lut(A.autocontrast_lut(xf), alpha, xf),
                  A.brightness_lut(xf, _where_op(op, "brightness", mag, 1.0)),
                  A.contrast_lut(xf, _where_op(op, "contrast", mag, 1.0), gray),
                  _blend_lut(A.equalize_lut(xf, index=idx), alpha, xf),
                  _blend_lut(_invert_lut(xf), alpha, xf),
                  A.posterize_lut(xf, _where_op(op, "posterize", mag, 8.0)),
                  A.solarize_lut(xf, _where_op(op, "solarize", mag, 256.0))]
    slot = torch.zeros_like(op)
    for i, name in enumerate(_LUT_OPS[1:], start=1):
        slot = torch.where(op == CTA_INDEX[name], i, slot)
    images = torch.arange(b, device=xf.device)
    lut = torch.stack([t.expand(b, c, 256) for t in candidates])[slot, images]
    xf = A.apply_lut(xf, lut, idx)
    # 2. Blends floor(a + f * (b - a)): Color/Sharpness blend (degenerate, x); Blur/Smooth
    #    blend (x, filtered x); every other image blends x with itself (unchanged).
    is_op = {n: (op == CTA_INDEX[n]).view(-1, 1, 1, 1) for n in _BLEND_OPS}
    smooth = A._smooth(xf)
    start = torch.where(is_op["color"], A._gray(xf), torch.where(is_op["sharpness"], smooth, xf))
    end = torch.where(is_op["blur"], _blur(xf), torch.where(is_op["smooth"], smooth, xf))
    factor = torch.where(is_op["color"] | is_op["sharpness"], mag.view(-1, 1, 1, 1),
                         alpha.view(-1, 1, 1, 1))
    xf = torch.floor(start + factor * (end - start)).clamp(0.0, 255.0)
    # 3. One affine warp for Rotate / Shear / Translate (official PIL calls; Translate sign as
    #    PIL's AFFINE (1, 0, t, 0, 1, 0): content moves t pixels left / up).
    eye = torch.eye(3, device=xf.device)
    mats = eye + sum(A._MATRICES[n](_where_op(op, n, mag, 0.0) * (-1.0 if n.startswith(
        "translate") else 1.0), h, w) - eye for n in _WARP_OPS)
    is_warp = sum((op == CTA_INDEX[n]).int() for n in _WARP_OPS).bool().view(-1, 1, 1, 1)
    xf = torch.where(is_warp, A._warp_float(xf, mats, fill), xf)
    # 4. The Cutout op: official [max(0, c - s // 2), min(size, c + s // 2)) squares, gray 127.
    cy, cx = cutout_centre if cutout_centre is not None else (
        torch.full_like(op, h // 2), torch.full_like(op, w // 2))
    half = torch.where(op == CTA_INDEX["cutout"], torch.div(mag, 2, rounding_mode="floor"),
                       0.0).long().view(-1, 1, 1)
    rows = torch.arange(h, device=xf.device).view(1, h, 1)
    cols = torch.arange(w, device=xf.device).view(1, 1, w)
    inside = ((rows >= cy.view(-1, 1, 1) - half) & (rows < cy.view(-1, 1, 1) + half)
              & (cols >= cx.view(-1, 1, 1) - half) & (cols < cx.view(-1, 1, 1) + half))
    xf = torch.where(inside.unsqueeze(1), float(CUTOUT_FILL), xf)
    return xf if x.dtype == torch.float32 else A._restore(xf, x)


def proximity(probs: Tensor, labels: Tensor) -> Tensor:
    """1 - |p - onehot(y)|_1 / 2 per image (paper Sec. 3.2.2; official train loop)."""
    onehot = (labels.view(-1, 1) == torch.arange(probs.shape[1], device=probs.device)).float()
    return 1.0 - 0.5 * (probs.float() - onehot).abs().sum(dim=1)


# ----------------------------------------------------------------------------- the policy

class CTAugment(nn.Module):
    """Bin weights (a buffer), the sampler, the strong view and the probe update."""

    def __init__(self, depth: int = DEPTH, decay: float = DECAY, threshold: float = THRESHOLD):
        super().__init__()
        if depth < 1 or not 0.0 <= decay < 1.0 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"CTAugment needs depth >= 1, decay in [0, 1) and threshold in "
                             f"[0, 1]; got {depth}, {decay}, {threshold}")
        self.depth, self.decay, self.threshold = depth, decay, threshold
        self.register_buffer("weights", torch.ones(len(CTA_OPS), MAX_BINS))
        bins = torch.tensor([NUM_BINS[n] for n in CTA_OPS]).view(-1, 1)
        self.register_buffer("num_bins", bins.flatten(), persistent=False)
        self.register_buffer("valid", torch.arange(MAX_BINS).view(1, -1) < bins,
                             persistent=False)
        # the trainer's Augmenter and generator, seen at the last strong view (probe_step's)
        self.augmenter: Augmenter | None = None
        self.generator: torch.Generator | None = None

    def bin_probs(self) -> Tensor:
        """(ops, MAX_BINS) sampling weights: official rate_to_p (weight + 1 - rho, divided by
        the op's largest, zero below the threshold) on the op's valid bins."""
        p = torch.where(self.valid, self.weights + (1.0 - self.decay), 0.0)
        p = p / p.amax(dim=1, keepdim=True)
        return torch.where(p < self.threshold, 0.0, p)

    def sample(self, n: int, gen: torch.Generator, probe: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
        """(op, bin, v) of shape (n, depth): uniform ops; bins by weight (probe: uniform v)."""
        dev, k = self.weights.device, self.depth
        op = torch.randint(0, len(CTA_OPS), (n, k), generator=gen, device=dev)
        r = torch.rand(n, k, generator=gen, device=dev)
        nb = self.num_bins[op].float()
        if probe:
            return op, torch.floor(r * nb * 0.999).long(), r  # official update's bin of v
        p = self.bin_probs()[op.flatten()]
        b = torch.multinomial(p, 1, generator=gen).view(n, k)
        return op, b, (b.float() + r) / nb

    def draw(self, n: int, size: tuple[int, int], gen: torch.Generator, probe: bool = False
             ) -> dict[str, Tensor]:
        """Every random choice for n images: op, bin, v and the Cutout op's centre (cy, cx),
        each of shape (n, depth)."""
        op, bins, v = self.sample(n, gen, probe)
        dev, k = op.device, self.depth
        cy = torch.randint(0, size[0], (n, k), generator=gen, device=dev)
        cx = torch.randint(0, size[1], (n, k), generator=gen, device=dev)
        return {"op": op, "bin": bins, "v": v, "cy": cy, "cx": cx}

    @staticmethod
    def apply(x_u8: Tensor, policy: dict[str, Tensor], fill: float) -> Tensor:
        """The depth slots of ``policy`` in order on a uint8 batch; float [0, 255] out."""
        xf = x_u8.float()
        for k in range(policy["op"].shape[1]):
            xf = apply_cta_ops(xf, policy["op"][:, k], policy["v"][:, k], fill,
                               (policy["cy"][:, k], policy["cx"][:, k]))
        return xf

    def strong_view(self, aug: Augmenter, x: Tensor, gen: torch.Generator) -> Tensor:
        """A normalized strong view (a view callable for Augmenter.view): weak flip + crop,
        the sampled transformations, then Cutout (paper Sec. 3.2.2)."""
        self.augmenter, self.generator = aug, gen
        xw = aug.weak_u8(x, gen)
        xf = self.apply(xw, self.draw(len(xw), xw.shape[2:], gen), aug.geometric_fill)
        return aug.normalize(aug._cutout(xf, gen).to(torch.uint8))

    @torch.no_grad()
    def update(self, op: Tensor, bins: Tensor, prox: Tensor) -> None:
        """weight <- rho * weight + (1 - rho) * proximity for every probe's (op, bin), probe
        after probe in order (the probes of all processes, rank order), as one scatter."""
        from imbssl.collectives import all_gather_cat

        k = op.shape[1]
        op, bins = all_gather_cat(op).flatten(), all_gather_cat(bins).flatten()
        prox = all_gather_cat(prox.float()).repeat_interleave(k)
        slots = op * MAX_BINS + bins
        hit = (slots.view(-1, 1) == torch.arange(self.weights.numel(), device=op.device))
        hit &= (op != CTA_INDEX["identity"]).view(-1, 1)
        hit = hit.float()
        count = hit.sum(0)
        later = (count.view(1, -1) - hit.cumsum(0)).mul(hit).sum(1)  # later hits, same bin
        contrib = (1.0 - self.decay) * self.decay ** later * prox * hit.amax(1)
        flat = self.weights.view(-1)
        flat.mul_(self.decay ** count).index_add_(0, slots, contrib)

    @torch.no_grad()
    def probe_step(self, model: nn.Module, x_lb: Tensor, y_lb: Tensor) -> Tensor:
        """Probe the normalized labeled batch x_lb: transform, predict with ``model``, update
        the weights; returns the mean proximity. Needs a strong view drawn before."""
        if self.augmenter is None or self.generator is None:
            raise RuntimeError("CTAugment.probe_step needs the Augmenter and generator of a "
                               "strong view drawn first (strong_view)")
        from imbssl.collectives import even_shard, world_size

        aug, gen = self.augmenter, self.generator
        n = len(x_lb) * world_size()  # draw for the global batch, keep this process's share
        policy = {k: t[even_shard(n)] for k, t in
                  self.draw(n, x_lb.shape[2:], gen, probe=True).items()}
        probes = self.apply(aug.to_u8(x_lb), policy, aug.geometric_fill)
        probs = torch.softmax(model(aug.normalize(probes).to(x_lb.dtype)).logits.float(), -1)
        prox = proximity(probs, y_lb)
        self.update(policy["op"], policy["bin"], prox)
        return prox.mean()


# ----------------------------------------------------------------------------- algorithm glue

STRONG_AUGMENTS = ("randaugment", "ctaugment")


def build_ctaugment(strong_augment: str) -> CTAugment | None:
    """The CTAugment policy for ``algorithm.strong_augment=ctaugment``; None for randaugment."""
    if strong_augment not in STRONG_AUGMENTS:
        from imbssl.errors import UserError

        raise UserError(f"algorithm.strong_augment must be one of {STRONG_AUGMENTS}, "
                        f"got {strong_augment!r}")
    return CTAugment() if strong_augment == "ctaugment" else None


def with_ctaugment(views: tuple, cta: CTAugment | None) -> tuple:
    """``views`` with every strong view drawn by ``cta`` (unchanged without it)."""
    return views if cta is None else tuple(cta.strong_view if v in STRONG_VIEWS else v
                                           for v in views)
