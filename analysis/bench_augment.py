"""Throughput of the batched weak / strong augmentations (images per second).

    python analysis/bench_augment.py [--batch 448] [--size 32] [--iters 20] [--threads N]
                                     [--devices cpu cuda]

Random uint8 (B, 3, H, W) batches; a few warm-up calls, then a timed loop
(torch.cuda.synchronize before reading the clock on CUDA). CUDA is skipped when absent.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imbssl.data.augment import Augmenter  # noqa: E402
from imbssl.data.sources import NORMALIZATION  # noqa: E402


def bench(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def run(device: torch.device, batch: int, size: int, warmup: int, iters: int) -> None:
    """Print images/s of weak and strong for one device."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen,
                      device=device)
    aug = Augmenter(*NORMALIZATION["cifar10"], flip=True)
    for name in ("weak", "strong"):
        sec = bench(lambda n=name: aug.view(n, x, gen), device, warmup, iters)
        print(f"{device.type:5s} {name:6s} batch={batch} {size}x{size}: "
              f"{batch / sec:12,.0f} images/s  ({sec * 1e3:8.2f} ms/batch)")


def main(argv=None) -> None:
    """Parse arguments and benchmark each available device."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=448)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name in args.devices:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print("cuda  skipped: no CUDA device")
            continue
        if name.startswith("cuda"):
            print(f"cuda  device: {torch.cuda.get_device_name(torch.device(name))}")
        run(torch.device(name), args.batch, args.size, args.warmup, args.iters)


if __name__ == "__main__":
    main()
