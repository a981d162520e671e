"""Per-step scalars without host syncs: each step adds its losses to device sums and notes,
per key, the first step at which a value became non-finite; a flush (at log, evaluation and
checkpoint steps only) averages them with one host transfer and stops the run on a NaN."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from imbssl.engine import distributed as ddp
from imbssl.engine.checkpoint import list_checkpoints
from imbssl.engine.stops import NonFiniteLossError

NEVER = 2**62  # "no non-finite value yet" in the first-bad-step accumulators


def due(step: int, every: int, total: int) -> bool:
    """Whether periodic work with interval ``every`` (0: never) falls on ``step``; the last
    step always gets it."""
    return every > 0 and (step % every == 0 or step == total)


@dataclass
class _Accumulator:
    """Per-step scalars of one set of keys, summed on the device since the last flush."""

    total: Tensor  # (n_keys,) float32 sums
    count: int  # steps added
    first_bad: Tensor  # (n_keys,) int64: first step (1-based) with a non-finite value, or NEVER



class ScalarLog:
    """The trainer's scalar accumulators (a part of :class:`imbssl.engine.trainer.Trainer`;
    owns ``_acc``; reads ``tcfg``, ``step_count``, ``tracker``, ``run_dir``)."""

    def _accumulate(self, loss: Tensor, logs: dict[str, Tensor], y_ulb: Tensor | None) -> None:
        """Add this step's scalars and note, per key, the first step with a non-finite
        value; a few tiny device ops, no host sync."""
        keys = ("loss/total", *[k for k, v in logs.items() if v.ndim == 0])
        values = torch.stack([loss.detach().float()]
                             + [logs[k].detach().float() for k in keys[1:]])
        bad_at = torch.where(torch.isfinite(values), NEVER, self.step_count + 1)
        acc = self._acc.get(keys)
        if acc is None:
            self._acc[keys] = _Accumulator(values, 1, bad_at)
        else:
            acc.total.add_(values)
            acc.count += 1
            torch.minimum(acc.first_bad, bad_at, out=acc.first_bad)
        if y_ulb is not None:
            self.tracker.update({k: v for k, v in logs.items() if k.startswith("pseudo/")}, y_ulb)

    def flush_scalars(self) -> dict[str, float]:
        """Average the accumulated scalars (one host transfer; with several processes, one
        all-reduce each for sums and first non-finite steps); raise ``NonFiniteLossError``
        naming the first step and loss term that became NaN or infinite."""
        if not self._acc:
            return {}
        groups = list(self._acc.items())
        self._acc = {}
        total = ddp.all_reduce_mean(torch.cat([a.total for _, a in groups]))
        first_bad = ddp.all_reduce_min(torch.cat([a.first_bad for _, a in groups]))
        host = torch.cat([total.double(), first_bad.double()]).tolist()
        n = len(host) // 2
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bad: dict[str, int] = {}
        i = 0
        for keys, acc in groups:
            for key in keys:
                sums[key] = sums.get(key, 0.0) + host[i]
                counts[key] = counts.get(key, 0) + acc.count
                if host[n + i] < NEVER:
                    bad[key] = min(bad.get(key, NEVER), int(host[n + i]))
                i += 1
        bad = {k: s for k, s in bad.items() if k.startswith("loss/")}
        if bad:
            raise NonFiniteLossError(self._non_finite_message(bad))
        return {k: sums[k] / counts[k] for k in sums}

    def _non_finite_message(self, bad: dict[str, int]) -> str:
        terms = {k: s for k, s in bad.items() if k != "loss/total"} or bad
        first = min(terms.values())
        named = sorted(k for k, s in terms.items() if s == first)
        later = [f"{k} from step {s}" for k, s in sorted(terms.items(), key=lambda kv: kv[1])
                 if s != first]
        found = list_checkpoints(self.run_dir / "checkpoints")
        kept = (f"the last good checkpoint {found[-1][1].name} (step {found[-1][0]}) is kept"
                if found else "no checkpoint had been written")
        return (f"non-finite loss (NaN or inf): {', '.join(named)} at step {first}"
                + (f" (then {', '.join(later)})" if later else "")
                + f"; training stopped at step {self.step_count} and {kept}; lower optim.lr, "
                "use trainer.precision=fp32 or check the data")

    def _flush_step(self) -> bool:
        """Whether this step logs, evaluates or checkpoints (and so syncs the host anyway)."""
        step, t = self.step_count, self.tcfg
        return any(every > 0 and (step % every == 0 or step == t.iterations)
                   for every in (t.log_interval, t.eval_interval, t.checkpoint_interval))

    def _pending_state(self) -> list:
        """Log sums since the last flush (only a preemption checkpoint has any); with several
        processes their mean over processes, which every process loads back: the mean of
        (that + its own later sums) is what the uninterrupted flush computes."""
        return [[list(keys), ddp.all_reduce_mean(a.total), a.count,
                 ddp.all_reduce_min(a.first_bad)] for keys, a in self._acc.items()]
