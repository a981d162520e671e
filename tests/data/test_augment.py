"""Batched augmentation: exact ops on known inputs, PIL parity, per-image randomness, seeding."""
import numpy as np
import pytest
import torch

from imbssl.data import augment as A
from imbssl.data.augment import Augmenter

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def rand_images(n=6, c=3, h=32, w=32, seed=0):
    """Random uint8 images (n, c, h, w)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def one_image(values, h, w, c=1):
    """A (1, c, h, w) uint8 image filled row-major from values."""
    return torch.as_tensor(values, dtype=torch.uint8).view(1, 1, h, w).expand(1, c, h, w).clone()


# ----------------------------------------------------------------------------- flip + crop

ARANGE = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)


@pytest.mark.parametrize(("flip", "oy", "ox", "expected"), [
    (False, 1, 1, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]),
    (True, 1, 1, [[3, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8], [15, 14, 13, 12]]),
    (False, 0, 0, [[5, 4, 5, 6], [1, 0, 1, 2], [5, 4, 5, 6], [9, 8, 9, 10]]),
    (False, 2, 2, [[5, 6, 7, 6], [9, 10, 11, 10], [13, 14, 15, 14], [9, 10, 11, 10]]),
    (True, 0, 2, [[6, 5, 4, 5], [2, 1, 0, 1], [6, 5, 4, 5], [10, 9, 8, 9]]),
])
def test_flip_crop_exact(flip, oy, ox, expected):
    out = A.flip_crop(ARANGE, torch.tensor([flip]), torch.tensor([oy]), torch.tensor([ox]), 1)
    assert out.dtype == torch.uint8 and out[0, 0].tolist() == expected
    a = ARANGE[0, 0].numpy()  # the same crop with numpy's reflect padding
    ref = np.pad(a[:, ::-1] if flip else a, 1, mode="reflect")[oy:oy + 4, ox:ox + 4]
    assert out[0, 0].numpy().tolist() == ref.tolist()


def test_weak_is_a_flip_crop_per_image():
    x = rand_images(n=40, h=8, w=8, seed=3)
    out = Augmenter(MEAN, STD).weak_u8(x, torch.Generator().manual_seed(0))
    pad = 1  # round(0.125 * 8)
    for i in range(len(x)):
        img = x[i].numpy()
        cands = [np.pad(im, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")[:, y:y + 8, z:z + 8]
                 for im in (img, img[:, :, ::-1]) for y in range(3) for z in range(3)]
        assert any(np.array_equal(out[i].numpy(), c) for c in cands)


def test_weak_without_flip_and_padding_is_identity():
    x = rand_images()
    aug = Augmenter(MEAN, STD, flip=False, pad_fraction=0.0)
    assert torch.equal(aug.weak_u8(x, torch.Generator().manual_seed(1)), x)
    assert Augmenter(MEAN, STD).pad(32) == 4 and Augmenter(MEAN, STD).pad(8) == 1


def test_flip_disabled_never_flips():
    x = one_image(np.tile(np.arange(8) * 30, 8), 8, 8).expand(64, 1, 8, 8).contiguous()
    out = Augmenter((0.5,), (0.5,), flip=False).weak_u8(x, torch.Generator().manual_seed(0))
    # Without flip every output row is non-decreasing except where reflection folds the edge.
    assert (out[:, 0, :, 2:6].diff(dim=-1) > 0).all()


# ----------------------------------------------------------------------------- single ops

def test_identity_solarize_posterize_brightness():
    ramp = one_image(np.arange(256), 16, 16)
    v = np.arange(256)
    assert torch.equal(A.identity(ramp), ramp)
    assert A.solarize(ramp, 128.0).flatten().tolist() == np.where(v < 128, v, 255 - v).tolist()
    assert A.solarize(ramp, 256.0).flatten().tolist() == v.tolist()  # threshold 256: no-op
    assert A.posterize(ramp, 4.0).flatten().tolist() == (v & 0xF0).tolist()
    assert A.posterize(ramp, 7.0).flatten().tolist() == (v & 0xFE).tolist()
    assert A.brightness(ramp, 0.5).flatten().tolist() == (v // 2).tolist()


def test_autocontrast_stretches_a_ramp():
    ramp = one_image(np.arange(50, 136), 2, 43)  # values 50..135: scale 255 / 85 = 3
    assert A.autocontrast(ramp).flatten().tolist() == [3 * v for v in range(86)]
    ramp = one_image(np.arange(50, 150), 10, 10)  # values 50..149: inexact scale
    out = A.autocontrast(ramp).flatten()
    scale = 255.0 / 99  # PIL: int(v * scale - lo * scale) in double precision, bit for bit
    assert out.tolist() == [int(v * scale - 50 * scale) for v in range(50, 150)]
    assert out[0] == 0 and out[-1] == 254 and (out.diff() > 0).all()  # PIL rounds 255 down
    flat = one_image(np.full(16, 77), 4, 4, c=3)
    assert torch.equal(A.autocontrast(flat), flat)  # constant channel: unchanged


def test_equalize_two_value_image():
    img = one_image(np.repeat([10, 200], 512), 32, 32, c=3)
    out = A.equalize(img)
    assert out.unique().tolist() == [0, 255]
    assert (out[..., :16, :] == 0).all() and (out[..., 16:, :] == 255).all()
    flat = one_image(np.full(64, 99), 8, 8)
    assert torch.equal(A.equalize(flat), flat)  # a single value: unchanged (PIL)


def test_blend_ops_on_known_inputs():
    gray = one_image(np.arange(64) * 4, 8, 8, c=3)  # R = G = B
    assert torch.equal(A.color(gray, 0.2), gray)  # no colour to remove
    flat = one_image(np.full(64, 130), 8, 8, c=3)
    assert torch.equal(A.sharpness(flat, 0.3), flat)  # nothing to smooth
    rgb = rand_images(n=2, h=8, w=8)
    low = A.contrast(rgb, 0.0)  # factor 0: the rounded mean gray level everywhere
    luma = (rgb[:, 0] * 19595.0 + rgb[:, 1] * 38470.0 + rgb[:, 2] * 7471.0 + 32768) // 65536
    mean = torch.floor(luma.mean(dim=(1, 2)) + 0.5)
    assert torch.equal(low.float(), mean.view(2, 1, 1, 1).expand_as(low))
    assert torch.equal(A.contrast(rgb, 1.0), rgb) and torch.equal(A.color(rgb, 1.0), rgb)
    assert torch.equal(A.sharpness(rgb, 1.0), rgb)


def test_geometric_ops_on_known_inputs():
    x = rand_images(n=3, h=8, w=8)
    assert torch.equal(A.rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(A.rotate(x, -90.0), torch.rot90(x, -1, dims=(2, 3)))
    assert torch.equal(A.rotate(x, 180.0), torch.rot90(x, 2, dims=(2, 3)))
    for op in (A.rotate, A.shear_x, A.shear_y, A.translate_x, A.translate_y):
        assert torch.equal(op(x, 0.0), x)
    t = A.translate_x(x, 3.0)  # content moves 3 pixels right, fill 128
    assert torch.equal(t[..., 3:], x[..., :-3]) and (t[..., :3] == 128).all()
    t = A.translate_y(x, torch.tensor([-2.0, 1.0, 0.0]))  # per-image magnitudes
    assert torch.equal(t[0, :, :-2], x[0, :, 2:]) and (t[0, :, -2:] == 128).all()
    assert torch.equal(t[1, :, 1:], x[1, :, :-1]) and torch.equal(t[2], x[2])
    s = A.shear_x(x, 0.5)  # x_in = x + 0.5 * y (continuous coordinates): row 0 sampled at +0.25
    assert torch.equal(s[..., 0, :], x[..., 0, :])


def test_cutout_region():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    out = A.cutout(x, torch.tensor([0, 6]), torch.tensor([2, 5]), 4)
    assert (out[0, :, 0:4, 2:6] == 127).all() and out[0].sum() == 127 * 3 * 16
    assert (out[1, :, 6:8, 5:8] == 127).all() and out[1].sum() == 127 * 3 * 6  # clipped


def test_ops_keep_dtype_shape_and_range():
    x = rand_images(n=4, h=12, w=12)
    for name, fn in A.OP_FUNCTIONS.items():
        for inp in (x, x.float()):
            out = fn(inp, torch.full((4,), 0.7 if name != "posterize" else 5.0))
            assert out.dtype == inp.dtype and out.shape == inp.shape, name
            assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round()), name


# ----------------------------------------------------------------------------- PIL parity

def pil_apply(x, fn):
    """Apply a PIL function image by image (reference only)."""
    from PIL import Image

    imgs = [np.asarray(fn(Image.fromarray(i.permute(1, 2, 0).numpy()))) for i in x]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)


def test_ops_match_pil():
    from PIL import Image, ImageEnhance, ImageOps

    x = rand_images(n=4, h=16, w=16, seed=7)
    x[1] = (x[1] // 3 + 60)  # a low-contrast image
    fill = (128, 128, 128)  # FixMatch's fill for geometric ops

    def affine(*coeffs):
        return lambda im: im.transform(im.size, Image.AFFINE, coeffs, fillcolor=fill)

    cases = [
        (A.autocontrast(x), ImageOps.autocontrast), (A.equalize(x), ImageOps.equalize),
        (A.posterize(x, 5.0), lambda im: ImageOps.posterize(im, 5)),
        (A.solarize(x, 103.0), lambda im: ImageOps.solarize(im, 103)),
        (A.brightness(x, 0.32), lambda im: ImageEnhance.Brightness(im).enhance(0.32)),
        (A.color(x, 0.41), lambda im: ImageEnhance.Color(im).enhance(0.41)),
        (A.contrast(x, 0.77), lambda im: ImageEnhance.Contrast(im).enhance(0.77)),
        (A.sharpness(x, 0.14), lambda im: ImageEnhance.Sharpness(im).enhance(0.14)),
        (A.rotate(x, -21.0), lambda im: im.rotate(-21, fillcolor=fill)),
        (A.shear_x(x, 0.27), affine(1, 0.27, 0, 0, 1, 0)),
        (A.shear_y(x, -0.15), affine(1, 0, 0, -0.15, 1, 0)),
        (A.translate_x(x, -4.0), affine(1, 0, 4, 0, 1, 0)),
        (A.translate_y(x, 3.0), affine(1, 0, 0, 0, 1, -3)),
    ]
    for i, (ours, ref) in enumerate(cases):
        assert torch.equal(ours, pil_apply(x, ref)), i


@pytest.mark.parametrize("fill", [0, 128])
def test_geometric_fill_value(fill):
    """A rotated image's uncovered corners hold `fill`, as PIL's rotate with that fillcolor."""
    x = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    out = A.rotate(x, 45.0, fill=fill)
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == fill).all() and (out[:, :, 8, 8] == 255).all()
    assert torch.equal(out, pil_apply(x, lambda im: im.rotate(45, fillcolor=(fill,) * 3)))
    for name in A.GEOMETRIC_OPS:  # every warp op, alone and through apply_ops, takes the fill
        mag = torch.full((2,), 0.3 if name.startswith("shear") else 45.0 if name == "rotate"
                         else 4.0)
        single = A.OP_FUNCTIONS[name](x, mag, fill=fill)
        assert (single == fill).any() and set(single.unique().tolist()) == {fill, 255}, name
        assert torch.equal(A.apply_ops(x, torch.full((2,), A.OP_INDEX[name]), mag, fill),
                           single), name


@pytest.mark.parametrize("fill", [0, 128])
def test_augmenter_threads_geometric_fill(fill, monkeypatch):
    """strong_u8 warps with the Augmenter's geometric_fill (no module-level global)."""
    seen = []
    warp = A._warp_float
    monkeypatch.setattr(A, "_warp_float", lambda xf, a, f=A.WARP_FILL: seen.append(f)
                        or warp(xf, a, f))
    Augmenter(MEAN, STD, geometric_fill=fill).strong_u8(rand_images(n=4), torch.Generator())
    assert seen and set(seen) == {float(fill)}


# ----------------------------------------------------------------------------- RandAugment

def test_fixmatch_magnitudes():
    level = torch.arange(1, 10)
    plus, minus = torch.ones(9), -torch.ones(9)

    def mags(name, sign=plus, size=32):
        return A.fixmatch_magnitudes(torch.full((9,), A.OP_INDEX[name]), level, sign, size,
                                     size).tolist()

    assert mags("posterize") == [4, 4, 5, 5, 6, 6, 6, 7, 7]
    assert mags("solarize") == [231, 205, 180, 154, 128, 103, 77, 52, 26]
    assert mags("rotate", minus) == [-3, -6, -9, -12, -15, -18, -21, -24, -27]
    assert mags("translate_x") == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # int(level/10 * 0.3 * 32)
    assert mags("translate_y", minus, 8) == [0, 0, 0, 0, -1, -1, -1, -1, -2]
    assert mags("brightness") == pytest.approx([0.05 + 0.09 * v for v in range(1, 10)])
    assert mags("shear_x", minus) == pytest.approx([-0.03 * v for v in range(1, 10)])
    assert mags("identity") == [0] * 9 and mags("equalize") == [0] * 9


def test_apply_ops_equals_single_ops():
    x = rand_images(n=5, h=16, w=16, seed=11)
    level = torch.tensor([1, 3, 5, 7, 9])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    for name, fn in A.OP_FUNCTIONS.items():
        op = torch.full((5,), A.OP_INDEX[name])
        mag = A.fixmatch_magnitudes(op, level, sign, 16, 16)
        assert torch.equal(A.apply_ops(x, op, mag), fn(x, mag)), name


def test_apply_ops_mixed_batch_has_no_crosstalk():
    n = len(A.RANDAUG_OPS)
    x = rand_images(n=n, h=16, w=16, seed=5)
    op = torch.arange(n)
    mag = A.fixmatch_magnitudes(op, torch.full((n,), 6), torch.ones(n), 16, 16)
    out = A.apply_ops(x, op, mag)
    for i, name in enumerate(A.RANDAUG_OPS):
        assert torch.equal(out[i:i + 1], A.OP_FUNCTIONS[name](x[i:i + 1], mag[i:i + 1])), name


def test_strong_per_image_randomness():
    x = rand_images(n=1).expand(64, 3, 32, 32).contiguous()
    aug = Augmenter(MEAN, STD)
    strong = aug.strong_u8(x, torch.Generator().manual_seed(0))
    weak = aug.weak_u8(x, torch.Generator().manual_seed(0))
    assert len({bytes(s.numpy()) for s in strong}) == 64
    assert len({bytes(w.numpy()) for w in weak}) > 40
    cut = (strong == 127).all(dim=1).sum(dim=(1, 2))  # every image has a gray cutout square
    assert (cut > 0).all()


def test_strong_seeded_determinism_and_types():
    x = rand_images(n=16)
    aug = Augmenter(MEAN, STD)
    a = aug.strong(x, torch.Generator().manual_seed(3))
    b = aug.strong(x, torch.Generator().manual_seed(3))
    c = aug.strong(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == x.shape
    u8 = aug.strong_u8(x, torch.Generator().manual_seed(3))
    assert u8.dtype == torch.uint8 and u8.shape == x.shape
    assert torch.equal(aug.normalize(u8), a)
    assert torch.equal(aug.weak(x, torch.Generator().manual_seed(9)),
                       aug.view("weak", x, torch.Generator().manual_seed(9)))


def test_normalize_and_views():
    x = rand_images(n=2)
    aug = Augmenter(MEAN, STD)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1)
    torch.testing.assert_close(aug.normalize(x), ref)
    assert torch.equal(aug.view("none", x), aug.normalize(x))
    with pytest.raises(ValueError, match="unknown view"):
        aug.view("medium", x, torch.Generator())
    with pytest.raises(ValueError, match="channels"):
        Augmenter((0.5,), (0.5,)).normalize(x)


def test_digits_sized_strong():
    x = rand_images(n=32, c=1, h=8, w=8)
    aug = Augmenter((0.3,), (0.37,), flip=False)
    out = aug.strong_u8(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert aug.strong(x, torch.Generator().manual_seed(0)).shape == (32, 1, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_same_code():
    x = rand_images(n=64).cuda()
    aug = Augmenter(MEAN, STD)
    g1, g2 = (torch.Generator(device="cuda").manual_seed(0) for _ in range(2))
    a, b = aug.strong(x, g1), aug.strong(x, g2)
    assert a.is_cuda and a.dtype == torch.float32 and torch.equal(a, b)
    for name, fn in A.OP_FUNCTIONS.items():  # each op gives the CPU result on CUDA
        mag = torch.full((64,), 0.5 if name != "posterize" else 6.0)
        assert torch.equal(fn(x, mag.cuda()).cpu(), fn(x.cpu(), mag)), name
