"""Batched image augmentation on device: weak (flip + reflect-pad crop), strong (RandAugment +
Cutout as in FixMatch, Sohn et al. 2020) and normalization.

Images are (B, C, H, W) uint8 tensors. Every random choice is drawn per image from a
``torch.Generator`` on the data's device, so the same code runs on CPU and CUDA with no loop
over images. Ops work on uint8 or float tensors holding integers in [0, 255], return the
input's dtype, and follow PIL's semantics (the reference RandAugment is PIL-based):

* the op pool, magnitude ranges (level 1..9 of 10), p=0.5 per op and Cutout of side 0.5*H
  filled with gray 127 follow DASO's / kekmodel's FixMatch RandAugment ("fixmatch_augment_pool");
* geometric ops sample with nearest neighbour and fill WARP_FILL = 128 as Google's FixMatch
  does, or any other fill passed as ``fill`` (official DASO's PIL calls fill black, 0).

Views at another size than the stored images (``Augmenter(size=...)``, STL-10's 96 -> 32 px)
follow the official DASO order (``lib/dataset/transform/transforms.py: Augmentation``): flip
and crop at the stored size, then an antialiased bilinear resize of the batch; the "strong"
view (FixMatch family, ``ra_first=True`` in ``build.py``) runs RandAugment and Cutout before
the resize, "strong_after_resize" (ReMixMatch, ``ra_first=False``) after it. Crop padding and
Cutout side are fixed in pixels as the official code fixes them (pad 4, ``CutoutAbs(16)``):
``pad_fraction`` and ``cutout`` times the *output* side, at whichever size they run.

Internally a RandAugment slot is applied in three vectorized groups: per-image per-channel
lookup tables (AutoContrast, Brightness, Contrast, Equalize, Identity, Posterize, Solarize),
blends with a degenerate image (Color, Sharpness) and one batched affine warp (Rotate, Shear,
Translate); images whose op is in another group pass through a group unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# FixMatch RandAugment pool, in the order of fixmatch_augment_pool().
RANDAUG_OPS: tuple[str, ...] = (
    "autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
    "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y",
)
OP_INDEX = {name: i for i, name in enumerate(RANDAUG_OPS)}
# Magnitude that makes each op the identity (used for images that did not pick the op).
NEUTRAL = {"brightness": 1.0, "color": 1.0, "contrast": 1.0, "sharpness": 1.0,
           "posterize": 8.0, "solarize": 256.0, "rotate": 0.0, "shear_x": 0.0,
           "shear_y": 0.0, "translate_x": 0.0, "translate_y": 0.0}
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Per op: its row among the channel-shared LUT candidates of apply_ops (0: identity).
_SHARED_LUT_SLOT = [("identity", "brightness", "contrast", "posterize", "solarize").index(n)
                    if n in ("brightness", "contrast", "posterize", "solarize") else 0
                    for n in RANDAUG_OPS]
_IS_GEOMETRIC = [n in GEOMETRIC_OPS for n in RANDAUG_OPS]
_CONSTS: dict[str, dict[str, Tensor]] = {}
WARP_FILL = 128.0  # Google FixMatch's fill of Rotate/Shear/Translate (default of `fill`)
CUTOUT_FILL = 127.0
# Strong views: RandAugment + Cutout before the resize (official ra_first=True) or after it.
STRONG_VIEWS = ("strong", "strong_after_resize")
LEVELS = 10  # magnitude levels: each op draws level ~ U{1, ..., LEVELS - 1}


# ----------------------------------------------------------------------------- helpers

def _consts(device: torch.device) -> dict[str, Tensor]:
    """Small constant tables, copied to each device once (no host-device sync per batch)."""
    key = str(device)
    if key not in _CONSTS:
        _CONSTS[key] = {"lut_slot": torch.tensor(_SHARED_LUT_SLOT, device=device),
                        "is_geometric": torch.tensor(_IS_GEOMETRIC, device=device),
                        "eye": torch.eye(3, device=device)}
    return _CONSTS[key]


def _as_float(x: Tensor) -> Tensor:
    """float32 view of an image batch (no copy when it already is float32)."""
    return x if x.dtype == torch.float32 else x.float()


def _restore(y: Tensor, like: Tensor) -> Tensor:
    """Clamp to [0, 255] and give y the dtype of the op's input."""
    y = y.clamp(0.0, 255.0)
    return y.round().to(torch.uint8) if like.dtype == torch.uint8 else y.to(like.dtype)


def _per_image(v: Tensor | float, x: Tensor) -> Tensor:
    """A float32 magnitude of shape (B,) on x's device."""
    v = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    return v.expand(x.shape[0]) if v.dim() == 0 else v


def _gray(xf: Tensor) -> Tensor:
    """PIL's "L" conversion (ITU-R 601-2 luma, integer rounding) as (B, 1, H, W)."""
    if xf.shape[1] == 1:
        return xf
    r, g, b = xf[:, 0:1], xf[:, 1:2], xf[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: Tensor, xf: Tensor, factor: Tensor) -> Tensor:
    """PIL Image.blend(degenerate, x, factor): truncated, clamped interpolation."""
    f = factor.view(-1, 1, 1, 1)
    return torch.floor(degenerate + f * (xf - degenerate)).clamp(0.0, 255.0)


# ----------------------------------------------------------------------------- lookup tables

def _levels(xf: Tensor) -> Tensor:
    """The 256 input values as a (1, 1, 256) float row."""
    return torch.arange(256, dtype=torch.float32, device=xf.device).view(1, 1, 256)


def _flat_index(x: Tensor) -> Tensor:
    """Pixel values as int64 indices of shape (B, C, H*W)."""
    return x.reshape(x.shape[0], x.shape[1], -1).long()


def apply_lut(x: Tensor, lut: Tensor, index: Tensor | None = None) -> Tensor:
    """out[b, c, h, w] = lut[b, c, x[b, c, h, w]] for a (B, C or 1, 256) table, one gather."""
    b, c, h, w = x.shape
    idx = _flat_index(x).clamp_(0, 255) if index is None else index
    return torch.gather(lut.expand(b, c, 256), 2, idx).view(b, c, h, w)


def identity_lut(xf: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """The identity table, (1, 1, 256)."""
    return _levels(xf)


def autocontrast_lut(xf: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """PIL ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    lo, hi = torch.aminmax(xf.reshape(xf.shape[0], xf.shape[1], -1), dim=2)
    lo, hi = lo.unsqueeze(-1).double(), hi.unsqueeze(-1).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1.0)  # not 255 / t: reciprocal
    # PIL's double-precision int(v * scale - lo * scale), bit for bit.
    lut = torch.floor(_levels(xf).double() * scale - lo * scale).clamp(0.0, 255.0).float()
    return torch.where(hi > lo, lut, _levels(xf))


def brightness_lut(xf: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance.Brightness: blend with black; (B, 1, 256)."""
    return torch.floor(_levels(xf) * factor.view(-1, 1, 1)).clamp(0.0, 255.0)


def contrast_lut(xf: Tensor, factor: Tensor, gray: Tensor | None = None) -> Tensor:
    """PIL ImageEnhance.Contrast: blend with the rounded mean gray level; (B, 1, 256)."""
    gray = _gray(xf) if gray is None else gray
    mean = torch.floor(gray.mean(dim=(1, 2, 3)) + 0.5).view(-1, 1, 1)
    return torch.floor(mean + factor.view(-1, 1, 1) * (_levels(xf) - mean)).clamp(0.0, 255.0)


def equalize_lut(xf: Tensor, magnitude: Tensor | None = None,
                 index: Tensor | None = None) -> Tensor:
    """PIL ImageOps.equalize per channel, from batched histograms (scatter_add, no loop)."""
    b, c = xf.shape[:2]
    idx = _flat_index(xf).clamp_(0, 255) if index is None else index
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=xf.device)
    hist.scatter_add_(2, idx, torch.ones(1, 1, 1, dtype=torch.int64,
                                         device=xf.device).expand_as(idx))
    levels = torch.arange(256, device=xf.device)
    top = torch.where(hist > 0, levels, 0).amax(dim=2, keepdim=True)  # highest value present
    step = (idx.shape[2] - hist.gather(2, top)) // 255
    before = torch.cumsum(hist, dim=2) - hist  # pixels strictly below each value
    lut = ((step // 2 + before) // step.clamp_min(1)).clamp_max(255)
    # PIL keeps the channel when step == 0 (which covers "fewer than two values").
    return torch.where(step == 0, levels, lut).float()


def posterize_lut(xf: Tensor, bits: Tensor) -> Tensor:
    """PIL ImageOps.posterize: keep the top `bits` bits of every value; (B, 1, 256)."""
    q = torch.exp2(8.0 - bits.clamp(0.0, 8.0)).view(-1, 1, 1)
    return torch.floor(_levels(xf) / q) * q


def solarize_lut(xf: Tensor, threshold: Tensor) -> Tensor:
    """PIL ImageOps.solarize: invert every value >= threshold; (B, 1, 256)."""
    v = _levels(xf)
    return torch.where(v < threshold.view(-1, 1, 1), v, 255.0 - v)


# ----------------------------------------------------------------------------- blends

def _smooth(xf: Tensor) -> Tensor:
    """PIL ImageFilter.SMOOTH (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13), borders unchanged."""
    if min(xf.shape[2:]) < 3:
        return xf
    rows = xf[..., :-2] + xf[..., 1:-1] + xf[..., 2:]  # separable 3x3 box sum (exact integers)
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    out = xf.clone()
    # (box + 4 * centre) / 13 is never exactly k + 0.5 (13 is odd), so rounding matches PIL.
    out[:, :, 1:-1, 1:-1] = torch.floor((box + 4.0 * xf[:, :, 1:-1, 1:-1]) / 13.0 + 0.5)
    return out


def _color_float(xf: Tensor, factor: Tensor) -> Tensor:
    """Color on a float batch."""
    return _blend(_gray(xf), xf, factor)


def _sharpness_float(xf: Tensor, factor: Tensor) -> Tensor:
    """Sharpness on a float batch."""
    return _blend(_smooth(xf), xf, factor)


# ----------------------------------------------------------------------------- affine warps

def _affine_rows(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """Stack per-image coefficients into (B, 3, 3) matrices [[a b c]; [d e f]; [0 0 1]]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).view(-1, 3, 3)


def _rotate_matrix(deg: Tensor, h: int, w: int) -> Tensor:
    """Output->input pixel map of a counter-clockwise rotation about the image centre."""
    t = torch.deg2rad(deg)
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2.0, h / 2.0
    return _affine_rows(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _shear_x_matrix(s: Tensor, h: int, w: int) -> Tensor:
    """PIL transform AFFINE (1, s, 0, 0, 1, 0): x_in = x + s * y."""
    z, o = torch.zeros_like(s), torch.ones_like(s)
    return _affine_rows(o, s, z, z, o, z)


def _shear_y_matrix(s: Tensor, h: int, w: int) -> Tensor:
    """PIL transform AFFINE (1, 0, 0, s, 1, 0): y_in = s * x + y."""
    z, o = torch.zeros_like(s), torch.ones_like(s)
    return _affine_rows(o, z, z, s, o, z)


def _translate_x_matrix(p: Tensor, h: int, w: int) -> Tensor:
    """Content moves p pixels right: x_in = x - p."""
    z, o = torch.zeros_like(p), torch.ones_like(p)
    return _affine_rows(o, z, -p, z, o, z)


def _translate_y_matrix(p: Tensor, h: int, w: int) -> Tensor:
    """Content moves p pixels down: y_in = y - p."""
    z, o = torch.zeros_like(p), torch.ones_like(p)
    return _affine_rows(o, z, z, z, o, -p)


_MATRICES: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "rotate": _rotate_matrix, "shear_x": _shear_x_matrix, "shear_y": _shear_y_matrix,
    "translate_x": _translate_x_matrix, "translate_y": _translate_y_matrix,
}


def warp(x: Tensor, pixel_matrix: Tensor, fill: float = WARP_FILL) -> Tensor:
    """Sample x at pixel_matrix @ (u, v, 1), continuous pixel coordinates with pixel centres
    at i + 0.5 (PIL's convention); nearest neighbour, outside pixels take `fill`."""
    return _restore(_warp_float(_as_float(x), pixel_matrix, fill), x)


def _warp_float(xf: Tensor, a: Tensor, fill: float = WARP_FILL) -> Tensor:
    """warp() on a float batch. The pixel-space map A becomes affine_grid's normalized map
    N A N^-1 with N = [[2/W, 0, -1], [0, 2/H, -1], [0, 0, 1]] (align_corners=False)."""
    b, c, h, w = xf.shape
    a = a.float()
    r = h / w
    t0 = torch.stack([a[:, 0, 0], a[:, 0, 1] * r,
                      a[:, 0, 0] + a[:, 0, 1] * r + 2.0 * a[:, 0, 2] / w - 1.0], dim=1)
    t1 = torch.stack([a[:, 1, 0] / r, a[:, 1, 1],
                      a[:, 1, 0] / r + a[:, 1, 1] + 2.0 * a[:, 1, 2] / h - 1.0], dim=1)
    grid = F.affine_grid(torch.stack([t0, t1], dim=1), [b, c, h, w], align_corners=False)
    return F.grid_sample(xf - fill, grid, mode="nearest", padding_mode="zeros",
                         align_corners=False) + fill


# ----------------------------------------------------------------------------- public ops

def identity(x: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """Identity."""
    return x.clone()


def autocontrast(x: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """AutoContrast: per-channel min/max stretched to 0/255."""
    return _restore(apply_lut(_as_float(x), autocontrast_lut(_as_float(x))), x)


def equalize(x: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """Equalize: per-image per-channel histogram equalization (PIL algorithm)."""
    return _restore(apply_lut(_as_float(x), equalize_lut(_as_float(x))), x)


def brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Brightness: x * factor (truncated), per-image factor."""
    return _restore(apply_lut(_as_float(x), brightness_lut(_as_float(x), _per_image(factor, x))), x)


def contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Contrast: blend with the image's mean gray level, per-image factor."""
    return _restore(apply_lut(_as_float(x), contrast_lut(_as_float(x), _per_image(factor, x))), x)


def posterize(x: Tensor, bits: Tensor | float) -> Tensor:
    """Posterize: keep `bits` most significant bits per image."""
    return _restore(apply_lut(_as_float(x), posterize_lut(_as_float(x), _per_image(bits, x))), x)


def solarize(x: Tensor, threshold: Tensor | float) -> Tensor:
    """Solarize: values >= threshold become 255 - value."""
    lut = solarize_lut(_as_float(x), _per_image(threshold, x))
    return _restore(apply_lut(_as_float(x), lut), x)


def color(x: Tensor, factor: Tensor | float) -> Tensor:
    """Color (saturation): blend with the grayscale image; identity for 1-channel images."""
    return _restore(_color_float(_as_float(x), _per_image(factor, x)), x)


def sharpness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Sharpness: blend with PIL's SMOOTH-filtered image."""
    return _restore(_sharpness_float(_as_float(x), _per_image(factor, x)), x)


def rotate(x: Tensor, degrees: Tensor | float, fill: float = WARP_FILL) -> Tensor:
    """Rotate counter-clockwise by `degrees` about the centre (PIL Image.rotate), fill `fill`."""
    return warp(x, _rotate_matrix(_per_image(degrees, x), *x.shape[2:]), fill)


def shear_x(x: Tensor, shear: Tensor | float, fill: float = WARP_FILL) -> Tensor:
    """ShearX as PIL's affine (1, s, 0, 0, 1, 0), fill `fill`."""
    return warp(x, _shear_x_matrix(_per_image(shear, x), *x.shape[2:]), fill)


def shear_y(x: Tensor, shear: Tensor | float, fill: float = WARP_FILL) -> Tensor:
    """ShearY as PIL's affine (1, 0, 0, s, 1, 0), fill `fill`."""
    return warp(x, _shear_y_matrix(_per_image(shear, x), *x.shape[2:]), fill)


def translate_x(x: Tensor, pixels: Tensor | float, fill: float = WARP_FILL) -> Tensor:
    """TranslateX: content moves `pixels` to the right (negative: left), fill `fill`."""
    return warp(x, _translate_x_matrix(_per_image(pixels, x), *x.shape[2:]), fill)


def translate_y(x: Tensor, pixels: Tensor | float, fill: float = WARP_FILL) -> Tensor:
    """TranslateY: content moves `pixels` down (negative: up), fill `fill`."""
    return warp(x, _translate_y_matrix(_per_image(pixels, x), *x.shape[2:]), fill)


OP_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "autocontrast": autocontrast, "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": equalize, "identity": identity, "posterize": posterize,
    "rotate": rotate, "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y,
    "solarize": solarize, "translate_x": translate_x, "translate_y": translate_y,
}


def flip_crop(x: Tensor, flip: Tensor, offset_y: Tensor, offset_x: Tensor, pad: int) -> Tensor:
    """Horizontal flip where flip[b], then the HxW crop at (offset_y, offset_x) of the
    reflect-padded image (offsets in [0, 2 * pad]), as one gather."""
    b, c, h, w = x.shape
    if pad >= min(h, w):
        raise ValueError(f"reflect padding {pad} must be smaller than the image size {h}x{w}")
    rows = _reflect(offset_y.view(-1, 1) + torch.arange(h, device=x.device) - pad, h)
    cols = _reflect(offset_x.view(-1, 1) + torch.arange(w, device=x.device) - pad, w)
    cols = torch.where(flip.view(-1, 1).bool(), w - 1 - cols, cols)
    idx = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, idx).view(b, c, h, w)


def _reflect(k: Tensor, n: int) -> Tensor:
    """Index k in (-n, 2n-1) mapped into [0, n) by reflection without repeating the edge."""
    return (n - 1) - ((n - 1) - k.abs()).abs()


def resize(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) images (uint8, or float holding integers) -> uint8 (B, C, size, size):
    antialiased bilinear, rounded; as torchvision's Resize of PIL images up to rounding."""
    if x.shape[2:] == (size, size):
        return x if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8)
    y = F.interpolate(_as_float(x), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def cutout(x: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Fill the square [top, top+size) x [left, left+size) (clipped) of each image with 127."""
    h, w = x.shape[2:]
    r = torch.arange(h, device=x.device).view(1, h, 1)
    c = torch.arange(w, device=x.device).view(1, 1, w)
    t, lft = top.view(-1, 1, 1), left.view(-1, 1, 1)
    inside = (r >= t) & (r < t + size) & (c >= lft) & (c < lft + size)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, int(CUTOUT_FILL)), x)


# ----------------------------------------------------------------------------- RandAugment

def fixmatch_magnitudes(op: Tensor, level: Tensor, sign: Tensor, height: int,
                        width: int) -> Tensor:
    """Per-image magnitude of op[b] at integer level[b] in 1..9, FixMatch/DASO ranges.

    float ops: level/10 * max + bias; int ops: int(level/10 * max) + bias (exact integer
    arithmetic); Rotate/Shear/Translate take a random sign; Solarize's threshold is 256 - v;
    Translate is int(level/10 * 0.3 * size) pixels.
    """
    lv = level.float()
    blend = lv * 0.09 + 0.05                  # (Brightness|Color|Contrast|Sharpness, 0.9, 0.05)
    table = {
        "posterize": ((level * 4) // 10 + 4).float(),          # (Posterize, 4, 4)
        "rotate": ((level * 30) // 10).float() * sign,         # (Rotate, 30, 0)
        "shear_x": lv * 0.03 * sign, "shear_y": lv * 0.03 * sign,  # (Shear, 0.3, 0)
        "solarize": (256 - (level * 256) // 10).float(),       # (Solarize, 256, 0)
        "translate_x": ((3 * level * width) // 100).float() * sign,   # (Translate, 0.3, 0)
        "translate_y": ((3 * level * height) // 100).float() * sign,
        "brightness": blend, "color": blend, "contrast": blend, "sharpness": blend,
    }
    zero = torch.zeros_like(lv)
    stacked = torch.stack([table.get(name, zero) for name in RANDAUG_OPS])
    return stacked.gather(0, op.view(1, -1).long()).squeeze(0)


def _op_magnitude(op: Tensor, magnitude: Tensor, name: str) -> Tensor:
    """magnitude where the image picked `name`, else the op's neutral value."""
    return torch.where(op == OP_INDEX[name], magnitude,
                       torch.full_like(magnitude, NEUTRAL.get(name, 0.0)))


def apply_ops(x: Tensor, op: Tensor, magnitude: Tensor, fill: float = WARP_FILL) -> Tensor:
    """Apply op RANDAUG_OPS[op[b]] with magnitude[b] to every image b (one RandAugment slot);
    geometric ops fill with `fill`.

    Each image is changed by exactly one group below; the others leave it unchanged exactly.
    """
    xf = _as_float(x)
    b, (h, w) = xf.shape[0], xf.shape[2:]
    mag, op = magnitude.float(), op.long()
    is_op = {n: (op == OP_INDEX[n]).view(-1, 1, 1) for n in ("autocontrast", "equalize")}
    idx, gray = _flat_index(xf), _gray(xf)
    # 1. Lookup tables: channel-shared candidates (B, 1, 256), then the per-channel ones.
    shared = torch.stack([
        _levels(xf).expand(b, 1, 256),
        brightness_lut(xf, _op_magnitude(op, mag, "brightness")),
        contrast_lut(xf, _op_magnitude(op, mag, "contrast"), gray),
        posterize_lut(xf, _op_magnitude(op, mag, "posterize")),
        solarize_lut(xf, _op_magnitude(op, mag, "solarize")),
    ])[_consts(xf.device)["lut_slot"][op], torch.arange(b, device=xf.device)]
    lut = torch.where(is_op["autocontrast"], autocontrast_lut(xf),
                      torch.where(is_op["equalize"], equalize_lut(xf, index=idx), shared))
    xf = apply_lut(xf, lut, idx)
    # 2. Blends (Color, Sharpness) in one pass: degenerate = x elsewhere, so x is kept exactly.
    is_color = (op == OP_INDEX["color"]).view(-1, 1, 1, 1)
    is_sharp = (op == OP_INDEX["sharpness"]).view(-1, 1, 1, 1)
    degenerate = torch.where(is_color, gray, torch.where(is_sharp, _smooth(xf), xf))
    factor = torch.where(is_color | is_sharp, mag.view(-1, 1, 1, 1), 1.0).view(-1)
    xf = _blend(degenerate, xf, factor)
    # 3. One affine warp: identity + the (single) chosen op's deviation from identity.
    eye = _consts(xf.device)["eye"]
    mats = eye + sum(_MATRICES[n](_op_magnitude(op, mag, n), h, w) - eye for n in GEOMETRIC_OPS)
    is_geo = _consts(xf.device)["is_geometric"][op].view(-1, 1, 1, 1)
    xf = torch.where(is_geo, _warp_float(xf, mats, fill), xf)
    return xf if x.dtype == torch.float32 else _restore(xf, x)


def _randint(low: int, high: int, n: int, gen: torch.Generator, device) -> Tensor:
    """n integers uniform in [low, high) from gen."""
    return torch.randint(low, high, (n,), generator=gen, device=device)


def _coin(n: int, gen: torch.Generator, device, p: float = 0.5) -> Tensor:
    """n booleans, True with probability p, from gen."""
    return torch.rand(n, generator=gen, device=device) < p


class Augmenter:
    """Weak / strong views and normalization for one dataset's mean and std ([0, 1] units)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], flip: bool = True,
                 pad_fraction: float = 0.125, randaug_n: int = 2, cutout: float = 0.5,
                 geometric_fill: float = WARP_FILL, size: int = 0):
        if len(mean) != len(std):
            raise ValueError(f"mean {mean} and std {std} have different lengths")
        if size < 0:
            raise ValueError(f"size must be >= 0 (0: views keep the images' size), got {size}")
        self.size = int(size)  # side of every view; 0 keeps the stored images' side
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.flip, self.pad_fraction = bool(flip), float(pad_fraction)
        self.randaug_n, self.cutout = int(randaug_n), float(cutout)
        self.geometric_fill = float(geometric_fill)
        self._norm_cache: dict[str, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        """Settings in one line."""
        return (f"Augmenter(mean={self.mean}, std={self.std}, flip={self.flip}, "
                f"pad_fraction={self.pad_fraction}, randaug_n={self.randaug_n}, "
                f"cutout={self.cutout}, geometric_fill={self.geometric_fill}, "
                f"size={self.size})")

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (or float in [0, 255]) -> float32 (x / 255 - mean) / std."""
        if x.shape[1] != len(self.mean):
            raise ValueError(f"images have {x.shape[1]} channels, normalization has "
                             f"{len(self.mean)}")
        scale, shift = self._norm_params(x.device)
        return torch.addcmul(shift, _as_float(x), scale)

    def _norm_params(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(scale, shift) of normalize on device, cached."""
        key = str(device)
        if key not in self._norm_cache:
            m = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            self._norm_cache[key] = (1.0 / (255.0 * s), -m / s)
        return self._norm_cache[key]

    def to_u8(self, x: Tensor) -> Tensor:
        """Inverse of normalize: normalized float32 -> the uint8 images (exact, rounded)."""
        scale, shift = self._norm_params(x.device)
        return ((x.float() - shift) / scale).round_().clamp_(0, 255).to(torch.uint8)

    def out_size(self, height: int) -> int:
        """Side of the views of images of side ``height``."""
        return self.size or height

    def pad(self, height: int) -> int:
        """Reflect padding of the random crop of images of side ``height``, in pixels:
        round(pad_fraction * output side) (4 at 32, 1 at 8; official DASO: 4 at STL-10's 96)."""
        return int(round(self.pad_fraction * self.out_size(height)))

    def cutout_side(self, height: int) -> int:
        """Cutout's side in pixels for images of side ``height``: int(cutout * output side)
        (16 at 32 px, official ``CutoutAbs(img, 16)``, also at STL-10's 96 px)."""
        return int(self.cutout * self.out_size(height))

    def resized(self, x: Tensor) -> Tensor:
        """x resized to the views' side (uint8); x itself when it has that side already."""
        return x if not self.size else resize(x, self.size)

    def flip_crop_u8(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Random horizontal flip (if enabled) + reflect-pad random crop at x's own size."""
        b, dev, pad = x.shape[0], x.device, self.pad(x.shape[2])
        flip = _coin(b, gen, dev) & self.flip
        oy = _randint(0, 2 * pad + 1, b, gen, dev)
        ox = _randint(0, 2 * pad + 1, b, gen, dev)
        return flip_crop(x, flip, oy, ox, pad)

    def weak_u8(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """flip_crop_u8, then the resize to the views' side; uint8 in, uint8 out."""
        return self.resized(self.flip_crop_u8(x, gen))

    def strong_u8(self, x: Tensor, gen: torch.Generator,
                  before_resize: bool = True) -> Tensor:
        """flip_crop_u8, then RandAugment (N ops, each applied w.p. 0.5) and Cutout, before
        the resize (official ``ra_first=True``) or after it; uint8 out."""
        x = self.flip_crop_u8(x, gen)
        cut = self.cutout_side(x.shape[2])
        if not before_resize:
            x = self.resized(x)
        b, dev, (h, w) = x.shape[0], x.device, x.shape[2:]
        xf = x.float()
        for _ in range(self.randaug_n):
            op = _randint(0, len(RANDAUG_OPS), b, gen, dev)
            level = _randint(1, LEVELS, b, gen, dev)
            sign = torch.where(_coin(b, gen, dev), -1.0, 1.0)
            op = torch.where(_coin(b, gen, dev), op, torch.full_like(op, OP_INDEX["identity"]))
            xf = apply_ops(xf, op, fixmatch_magnitudes(op, level, sign, h, w),
                           self.geometric_fill)
        return self.resized(self._cutout(xf, gen, cut).to(torch.uint8))

    def _cutout(self, xf: Tensor, gen: torch.Generator, size: int | None = None) -> Tensor:
        """FixMatch CutoutAbs: square of side ``size`` (default cutout_side) around a uniform
        centre, clipped."""
        b, dev, (h, w) = xf.shape[0], xf.device, xf.shape[2:]
        size = self.cutout_side(h) if size is None else size
        if size <= 0:
            return xf
        cy = torch.rand(b, generator=gen, device=dev) * h
        cx = torch.rand(b, generator=gen, device=dev) * w
        top = (cy - size / 2.0).clamp_min(0).floor().long()
        left = (cx - size / 2.0).clamp_min(0).floor().long()
        return cutout(xf, top, left, size)

    def weak(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Normalized float32 weak view."""
        return self.normalize(self.weak_u8(x, gen))

    def strong(self, x: Tensor, gen: torch.Generator, before_resize: bool = True) -> Tensor:
        """Normalized float32 strong view."""
        return self.normalize(self.strong_u8(x, gen, before_resize))

    def view(self, name, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """The view called name: "weak", "strong" (RandAugment + Cutout before the resize),
        "strong_after_resize" or "none" (resize and normalization only), or a callable
        view(augmenter, x, gen) an algorithm brings (CTAugment's strong view)."""
        if callable(name):
            return name(self, x, gen)
        if name == "none":
            return self.normalize(self.resized(x))
        if name not in ("weak", *STRONG_VIEWS):
            raise ValueError(f"unknown view {name!r}; expected 'weak', "
                             f"{', '.join(map(repr, STRONG_VIEWS))} or 'none'")
        if gen is None:
            raise ValueError(f"the {name!r} view needs a torch.Generator")
        if name == "weak":
            return self.weak(x, gen)
        return self.strong(x, gen, before_resize=name == "strong")
