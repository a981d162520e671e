"""Forward + backward time of the candidate CPU backbones for the mini protocol.

    python analysis/bench_backbones.py [--threads 2] [--batch 160] [--iters 5]

One step of the mini protocol trains on 32 labeled + 2 x 64 unlabeled views = 160 images of
32x32x3; this times one SGD step (forward, backward, update) of each backbone on such a batch,
in the default and the channels_last memory format. Numbers depend on the machine and on
whatever else runs: measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imbssl.models import build_model  # noqa: E402

CANDIDATES = ("small_cnn", "wrn16_1", "wrn28_2")


def step_time(name: str, batch: int, iters: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    net = build_model(name, 10, 3).train()
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def one() -> None:
        net(x).logits.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        one()
    start = time.perf_counter()
    for _ in range(iters):
        one()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=160)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| backbone | parameters | ms / step (NCHW) | ms / step (channels_last) |")
    print("|---|---|---|---|")
    for name in CANDIDATES:
        params = sum(p.numel() for p in build_model(name, 10, 3).parameters())
        t = [step_time(name, args.batch, args.iters, cl) * 1000 for cl in (False, True)]
        print(f"| {name} | {params:,} | {t[0]:.0f} | {t[1]:.0f} |")


if __name__ == "__main__":
    main()
