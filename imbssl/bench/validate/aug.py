"""Check 1, ``aug``: the CUDA augmentation equals the CPU one (see the package docstring)."""
from __future__ import annotations

from collections import Counter

import torch

from imbssl.bench.validate.common import AUG_IMAGES, AUG_TOLERANCE, Context, failed, passed, skipped


def draw_strong_params(aug, n: int, height: int, width: int, gen: torch.Generator) -> dict:
    """Every random choice of ``aug.strong_u8`` for n images, drawn from ``gen`` in the same
    order and with the same helpers (imbssl/data/augment.py), on gen's device."""
    from imbssl.data import augment as A

    dev = gen.device
    pad = aug.pad(height)
    p = {"flip": A._coin(n, gen, dev) & aug.flip,
         "oy": A._randint(0, 2 * pad + 1, n, gen, dev),
         "ox": A._randint(0, 2 * pad + 1, n, gen, dev), "slots": []}
    for _ in range(aug.randaug_n):
        op = A._randint(0, len(A.RANDAUG_OPS), n, gen, dev)
        level = A._randint(1, A.LEVELS, n, gen, dev)
        sign = torch.where(A._coin(n, gen, dev), -1.0, 1.0)
        op = torch.where(A._coin(n, gen, dev), op, torch.full_like(op, A.OP_INDEX["identity"]))
        p["slots"].append((op, A.fixmatch_magnitudes(op, level, sign, height, width)))
    size = int(aug.cutout * height)
    if size > 0:
        cy = torch.rand(n, generator=gen, device=dev) * height
        cx = torch.rand(n, generator=gen, device=dev) * width
        p["top"] = (cy - size / 2.0).clamp_min(0).floor().long()
        p["left"] = (cx - size / 2.0).clamp_min(0).floor().long()
    return p


def params_to(p: dict, device) -> dict:
    out = {k: v.to(device) for k, v in p.items() if isinstance(v, torch.Tensor)}
    out["slots"] = [(op.to(device), mag.to(device)) for op, mag in p["slots"]]
    return out


def replay_weak(aug, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The weak view (uint8) of x with the drawn flip and crop."""
    from imbssl.data.augment import flip_crop

    return flip_crop(x, p["flip"], p["oy"], p["ox"], aug.pad(x.shape[2]))


def replay_strong(aug, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The strong view (uint8) of x with the drawn choices, on x's device."""
    from imbssl.data.augment import apply_ops, cutout

    xf = replay_weak(aug, x, p).float()
    for op, magnitude in p["slots"]:
        xf = apply_ops(xf, op, magnitude)
    if "top" in p:
        xf = cutout(xf, p["top"], p["left"], int(aug.cutout * x.shape[2]))
    return xf.to(torch.uint8)


def _aug_images(ctx: Context) -> tuple[torch.Tensor, str]:
    """Test images of the validated dataset as uint8 (N, C, H, W), and where they came from."""
    from imbssl.data import load_source

    name, root = ("digits", "datasets") if ctx.dry else ("cifar10", ctx.data_root)
    src = load_source(name, root)
    x = torch.from_numpy(src.test_images[:AUG_IMAGES]).permute(0, 3, 1, 2).contiguous()
    return x, f"{name} test images ({len(x)})"


def check_aug(ctx: Context) -> dict:
    from imbssl.data import NORMALIZATION, Augmenter
    from imbssl.data.augment import RANDAUG_OPS

    x, source = _aug_images(ctx)
    aug = Augmenter(*NORMALIZATION["digits" if ctx.dry else "cifar10"], flip=not ctx.dry)
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    p = draw_strong_params(aug, n, h, w, torch.Generator().manual_seed(0))
    cpu = replay_strong(aug, x, p)
    reference = aug.strong_u8(x, torch.Generator().manual_seed(0))
    if not torch.equal(cpu, reference):
        return failed("the CPU replay differs from Augmenter.strong_u8 for the same seed; "
                      "draw_strong_params no longer follows imbssl/data/augment.py",
                      images=source)
    details = {"images": source, "cpu_replay_equals_strong_u8": True}
    if not torch.cuda.is_available():
        return skipped("no CUDA device: only the CPU replay was checked", **details)
    pc = params_to(p, "cuda")
    x_cuda = x.cuda()
    same_seed = [aug.strong_u8(x_cuda, torch.Generator(device="cuda").manual_seed(0))
                 for _ in range(2)]
    weak_equal = torch.equal(replay_weak(aug, x.cuda(), pc).cpu(), replay_weak(aug, x, p))
    cuda = replay_strong(aug, x.cuda(), pc).cpu()
    diff = cuda.int() - cpu.int()
    bad_images = diff.ne(0).flatten(1).any(1).nonzero().flatten().tolist()
    ops_of_bad = Counter(RANDAUG_OPS[int(op[i])] for op, _ in p["slots"] for i in bad_images
                         if RANDAUG_OPS[int(op[i])] != "identity")
    norm_cpu, norm_cuda = aug.normalize(cpu), aug.normalize(cpu.cuda()).cpu()
    details.update({
        "cuda_generator_repeatable": bool(torch.equal(*same_seed)),
        "weak_bitwise_equal": weak_equal, "strong_bitwise_equal": bool(diff.eq(0).all()),
        "strong_pixels_differing": int(diff.ne(0).sum()),
        "strong_fraction_differing": float(diff.ne(0).float().mean()),
        "strong_max_abs_diff": int(diff.abs().max()), "images_differing": len(bad_images),
        "ops_in_differing_images": dict(ops_of_bad), "tolerance_fraction": AUG_TOLERANCE,
        "normalize_max_abs_diff": float((norm_cpu - norm_cuda).abs().max())})
    if (not weak_equal or not details["cuda_generator_repeatable"]
            or details["strong_fraction_differing"] > AUG_TOLERANCE):
        return failed("CUDA augmentation differs from the CPU beyond the tolerance", **details)
    return passed(**details)
