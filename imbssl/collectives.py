"""Collectives every layer may use: the ground floor under algorithms, refiners, data,
diagnostics and the engine. Each is the identity (or the trivial value) when
``torch.distributed`` is not initialised, so a one-process run takes the same code path.

Process-group setup, replica broadcasts and the gradient all-reduce are the engine's
(:mod:`imbssl.engine.distributed`, which also explains how the global batch is shared).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1



def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` of every rank along dim 0, in rank order (identity for one process).

    Every rank must pass a tensor of the same shape (the engine gives every rank an equal
    share of the global batch). The result carries no gradient.
    """
    if not is_distributed():
        return t
    if t.dtype == torch.bool:  # not every backend gathers bool
        return all_gather_cat(t.to(torch.uint8)).bool()
    t = t.detach().contiguous()
    out = torch.empty((world_size() * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    if dist.get_backend() == "gloo":  # gloo: the list form is supported by every release
        dist.all_gather(list(out.chunk(world_size())), t)
    else:
        dist.all_gather_into_tensor(out, t)
    return out


def _all_reduce(t: Tensor, op) -> Tensor:
    """``op`` over ranks, element-wise, into a new tensor (``t`` itself for one process)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """The element-wise sum over ranks (a new tensor; ``t`` itself for one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_mean(t: Tensor) -> Tensor:
    """The element-wise mean over ranks (a new tensor; ``t`` itself for one process)."""
    if not is_distributed():
        return t
    out = all_reduce_sum(t.float() if not t.is_floating_point() else t)
    return out / world_size()


def all_reduce_min(t: Tensor) -> Tensor:
    """The element-wise minimum over ranks (a new tensor; ``t`` itself for one process)."""
    return _all_reduce(t, dist.ReduceOp.MIN)


def any_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true in any process: one tiny all-reduce and a host sync (``flag``
    itself, with neither, for one process), so call it where the host syncs anyway."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int32,
                                            device=device)).item())


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the last rank takes the remainder)."""
    size, r = world_size(), rank()
    per = n // size
    return slice(r * per, n if r == size - 1 else (r + 1) * per)


def even_shard(n: int) -> slice:
    """This rank's share of a global batch of ``n`` items (``n`` divisible by the world size)."""
    size, r = world_size(), rank()
    if n % size:
        raise ValueError(f"a global batch of {n} cannot be split evenly over {size} processes")
    per = n // size
    return slice(r * per, (r + 1) * per)


__all__ = ["all_gather_cat", "all_reduce_mean", "all_reduce_min", "all_reduce_sum",
           "any_process", "even_shard", "is_distributed", "rank", "shard", "world_size"]
