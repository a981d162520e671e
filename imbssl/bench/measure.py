"""Measuring one training step: device sync, peak memory, chunked step timing, FLOPs per
step and per image, images per step, the device's name and peak FLOP/s.

Shared by ``imbssl bench`` (:mod:`imbssl.bench.throughput`) and the GPU validation
(:mod:`imbssl.bench.validate`); see the former's docstring for what each figure means.
"""
from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time

import torch

ESTIMATE_ITERS = 250_000  # DASO's protocol: 250k iterations
# bf16 dense tensor-core peak (TFLOP/s) by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("A100", 312.0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maxrss_mb() -> float:
    """Process high-water resident set size in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _rss_mb() -> float | None:
    """Current resident set size in MiB from /proc/self/statm (None where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so an RSS baseline is not inflated."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of one case, from ``begin()`` (before the trainer is built) to ``end()``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset. CPU: the growth of the
    resident set size, sampled every 10 ms from /proc/self/statm by a thread, over a baseline
    taken after gc + malloc_trim; where /proc is missing, the growth of ``ru_maxrss`` (which
    reads 0 when an earlier case already reached a higher peak). Either way the figure holds
    the dataset copy, model, optimizer state and the step's activations; DataLoader worker
    processes are not counted.
    """

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.base = self.peak = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.sampled = device.type != "cuda" and _rss_mb() is not None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return ("torch.cuda.max_memory_allocated (device memory incl. the device-resident "
                    "dataset)")
        if self.sampled:
            return ("CPU: peak growth of the process RSS over the case (sampled every 10 ms "
                    "from /proc/self/statm; incl. the dataset copy; DataLoader workers not "
                    "counted)")
        return "CPU: growth of the process peak RSS (ru_maxrss) over the case"

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if not self.sampled:
            self.base = maxrss_mb()
            return
        gc.collect()
        _malloc_trim()
        self.base = self.peak = _rss_mb() or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mb() or 0.0)

    def end(self) -> float:
        """Peak MiB since begin()."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.sampled:
            return max(0.0, maxrss_mb() - self.base)
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb() or 0.0)
        return max(0.0, self.peak - self.base)


def time_steps(trainer, warmup: int, iters: int, chunks: int = 5) -> dict:
    """Run ``warmup`` untimed and ``iters`` timed training steps, timed in up to ``chunks``
    consecutive chunks (one device sync at the end of each). The reported rate is the median
    of the chunk rates, which resists interference from other processes on a shared machine;
    the mean over all timed steps and the slowest/fastest chunk are kept too."""
    for _ in range(warmup):
        trainer.train_step()
    trainer.flush_scalars()
    _sync(trainer.device)
    chunks = max(1, min(chunks, iters))
    sizes = [iters // chunks + (1 if i < iters % chunks else 0) for i in range(chunks)]
    rates, total = [], 0.0
    for n in sizes:
        start = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        _sync(trainer.device)
        seconds = time.perf_counter() - start
        rates.append(n / seconds)
        total += seconds
    trainer.flush_scalars()  # one host transfer; raises on a non-finite loss
    return {"iters": iters, "seconds": total, "its_per_s": statistics.median(rates),
            "its_per_s_mean": iters / total, "its_per_s_min": min(rates),
            "its_per_s_max": max(rates)}


def forward_flops_per_image(trainer) -> float:
    """FLOPs of one forward of the model per image (FlopCounterMode, matmul/conv only)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(trainer.model).eval()
    x = trainer.data.augmenter.view("none", trainer.data.labeled.images[:2])  # views' size
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    del model
    return counter.get_total_flops() / x.shape[0]


def counted_step_flops(trainer) -> float | None:
    """FLOPs of one whole training step (forward + backward of every pass) under
    FlopCounterMode, run eagerly; None if counting fails for this step."""
    from torch.utils.flop_counter import FlopCounterMode

    compiled, trainer.forward_model = trainer.forward_model, trainer.model
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            trainer.train_step()
    except Exception:  # noqa: BLE001 - counting is best-effort, the timing does not need it
        return None
    finally:
        trainer.forward_model = compiled
    return float(counter.get_total_flops())


def images_per_step(trainer) -> dict:
    """Labeled, unlabeled (all views) and no-grad images of one step; trained images for the
    FLOP estimate (every image in a forward with gradient)."""
    algo = trainer.algo
    b = trainer.tcfg.batch_size
    ub = b * int(algo.cfg.uratio) if algo.unlabeled_views else 0
    views = len(algo.unlabeled_views)
    daso = getattr(algo.refiner, "needs_labeled_features", False)
    name = type(algo).__name__.lower()
    lb = b * (1 + len(algo.labeled_views))  # the weak view and any extra labeled views
    trained = lb + ub * views
    nograd = b if daso else 0
    if name == "remixmatch":  # weak + strong1, mixed (lb + 3 views), rotated strong1
        trained = 2 * ub + (b + ub * views) + ub
    elif name == "mixmatch":  # guess on both weak views (grad only with DASO), mixed batch
        trained = (b + ub * views) + (ub * views if daso else 0)
        nograd += 0 if daso else ub * views
    elif name == "simmatch":  # EMA bank forward of the labeled batch
        nograd += b
    return {"labeled": lb, "unlabeled": ub * views, "views": views, "uratio": ub // b if b else 0,
            "total": lb + ub * views, "trained": trained, "no_grad": nograd}


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"
