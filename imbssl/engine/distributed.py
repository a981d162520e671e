"""Multi-process (multi-GPU) training: ``torchrun --nproc_per_node=N -m imbssl train ...``.

Everything here is the identity when ``torch.distributed`` is not initialised, so the
single-process code path is the same code.

Why not ``DistributedDataParallel``
-----------------------------------
A training step of several algorithms runs the network more than once before one backward:
ReMixMatch (guess pass, mixed pass, rotation pass), SimMatch and DASO (EMA-model forwards of
the labeled batch), MixMatch. The DDP wrapper registers its gradient hooks per forward and
refuses a second forward of the wrapped module before a backward (or needs
``find_unused_parameters``/static-graph workarounds that differ per algorithm). What DDP
computes is simple, though: after ``loss.backward()`` every rank holds the gradient of *its*
mean loss; DDP all-reduces (sums) the gradients in buckets of ~25 MB and divides by the world
size, so every rank applies the gradient of the global mean loss and the replicas stay equal.
:class:`GradientAllReduce` does exactly that arithmetic, explicitly, after the backward (no
overlap of communication with the backward: the price of not hooking into autograd; on one
node with NVLink the all-reduce of a WRN-28-2's 1.5M parameters is well under a millisecond).
Like DDP's ``broadcast_buffers=True``, :func:`broadcast_buffers` copies rank 0's module buffers
(batch-norm running statistics) to the other ranks every step, so the EMA models stay equal;
with ``trainer.sync_bn=true`` the statistics are computed over the global batch instead.

The global batch does not depend on the world size
--------------------------------------------------
Every rank holds the same seeded index streams and augmentation generator, draws the same
*global* batch (``trainer.batch_size`` labeled, times ``uratio`` unlabeled), augments all of
it and keeps its contiguous slice (``rank * B / N`` to ``(rank + 1) * B / N``). The random
numbers consumed are therefore exactly those of a one-process run, and a checkpoint resumes
under any world size. The cost: each rank augments the whole global batch (N times the
augmentation work of its own share; augmentation is element-wise uint8 work on the device, a
few per cent of a WRN step) and gathers the global batch's images from its own copy of the
dataset (which every rank keeps on its device anyway).

Cross-rank state
----------------
* Losses are means over each rank's equal share, so the averaged gradient is that of the
  global mean loss (exact arithmetic up to floating-point rounding).
* DASO: the labeled features and labels are all-gathered before they are queued, and the
  final pseudo-labels before they are counted into ``m_hat`` (rank order = global batch
  order, so the queues equal a one-process run's).
* Distribution alignment: the batch-mean prediction is all-reduced (mean over equal shares).
* SimMatch's labeled bank: ``update_bank`` must all-gather the embeddings *and* the indices
  with :func:`all_gather_cat` before ``index_copy_``.
* Pseudo-label confusion matrices and the logged scalar means: all-reduced at a flush.
* Evaluation: each rank evaluates a contiguous shard of the test set, counts are summed.
* Logging, checkpoints, summaries and reports: rank 0 only; every rank loads the checkpoint.
* Preemption: a signal may reach one process only; :func:`any_process` agrees on the stop at
  the next log/eval/checkpoint step (where the host syncs anyway), never on every step.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from imbssl.collectives import (  # noqa: F401 - the engine's callers use them from here too
    all_gather_cat,
    all_reduce_mean,
    all_reduce_min,
    all_reduce_sum,
    any_process,
    even_shard,
    is_distributed,
    rank,
    shard,
    world_size,
)

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@dataclass
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int


def launch_info() -> LaunchInfo | None:
    """The ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK), or None for one process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    return LaunchInfo(int(os.environ.get("RANK", "0")), size,
                      int(os.environ.get("LOCAL_RANK", "0")))


def init_group(backend: str, **kwargs) -> None:
    """``dist.init_process_group``, with ``torch.distributed.nn`` imported first.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated at import. The
    import happens lazily (torch.compile, the optimizers and dynamo pull it in); after
    ``init_process_group`` those defaults would pin the default group for the life of the
    interpreter, so ``destroy_process_group`` could not join gloo's worker threads, and a
    worker still dropping its last collective at interpreter exit aborts the process
    ("terminate called without an active exception", SIGABRT).
    """
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is used, gloo on the CPU.
    Returns False (and does nothing) for a single process.
    """
    info = launch_info()
    if info is None or is_distributed():
        return is_distributed()
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    init_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- replicas
def _buckets(tensors: list[Tensor], cap: int = BUCKET_BYTES) -> list[list[Tensor]]:
    """Consecutive groups of tensors of one dtype and device, each at most ~``cap`` bytes."""
    out: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if (last is None or size + nbytes > cap or last[0].dtype != t.dtype
                or last[0].device != t.device):
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


def _flat_op(tensors: list[Tensor], op, scale: float = 1.0) -> None:
    """Apply the asynchronous collective ``op`` to ``tensors`` as flat buckets (all launched
    before the first wait), multiply by ``scale`` and copy the results back."""
    pending = []
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, op(flat)))
    for bucket, flat, work in pending:
        if work is not None:
            work.wait()
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


class GradientAllReduce:
    """DDP's gradient arithmetic after ``backward``: bucketed all-reduce, divide by N.

    Parameters without a gradient are skipped (on every rank alike: every rank runs the same
    code on the same shapes). Called before ``optimizer.step`` (and before the grad scaler
    unscales, so fp16 overflow is detected consistently on every rank).
    """

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    @torch.no_grad()
    def __call__(self) -> None:
        if not is_distributed():
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        _flat_op(grads, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True),
                 scale=1.0 / world_size())


@torch.no_grad()
def broadcast_module(module: nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
    if not is_distributed():
        return
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers()]
    if tensors:
        _flat_op(tensors, lambda flat: dist.broadcast(flat, src=0, async_op=True))


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) to every rank, as DDP's broadcast_buffers."""
    broadcast_module(module, buffers_only=True)


def broadcast_object(obj):
    """A picklable object from rank 0 to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "GradientAllReduce", "all_gather_cat", "all_reduce_mean", "all_reduce_min",
    "all_reduce_sum", "any_process", "barrier", "broadcast_buffers", "broadcast_module",
    "broadcast_object", "even_shard", "init_from_env", "init_group", "is_distributed", "is_main",
    "launch_info", "local_rank", "rank", "shard", "shutdown", "world_size",
]
