"""Per-class quality of pseudo-labels, accumulated on the training device without host syncs.

The trainer calls ``update(logs, true_labels)`` every step with the ``pseudo/...`` entries an
algorithm logs (see ``imbssl/algorithms/base.py``) and the true labels of the unlabeled batch,
then ``flush(step, class_names)`` once per evaluation, which moves all confusion matrices to
the host in a single transfer, turns them into ``per_class.csv`` rows and resets them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from imbssl.collectives import all_reduce_sum
from imbssl.diagnostics.metrics import confusion_to_metrics, per_class_rows

PSEUDO_KINDS = ("linear", "semantic", "final")
SUBSETS = ("all", "confident")


class PseudoLabelTracker:
    """Confusion matrices of pseudo-labels (per kind, all vs confident) against true labels."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self._confusion: dict[str, Tensor] = {}
        self.last_summary: dict[str, float] = {}

    def _matrix(self, key: str) -> Tensor:
        """The flat K*K accumulator for ``key`` ("kind/subset"), created on first use."""
        if key not in self._confusion:
            k2 = self.num_classes * self.num_classes
            self._confusion[key] = torch.zeros(k2, dtype=torch.int64, device=self.device)
        return self._confusion[key]

    @torch.no_grad()
    def update(self, logs: dict[str, Tensor], true_labels: Tensor) -> None:
        """Add one batch; skipped (without a host sync) when any true label is negative."""
        true = true_labels.detach().to(self.device, non_blocking=True).reshape(-1).long()
        valid = (true >= 0).all().long()  # 0-d, stays on device
        base = true.clamp_min(0) * self.num_classes
        mask = logs.get("pseudo/mask")
        if mask is not None:
            mask = mask.detach().to(self.device, non_blocking=True).reshape(-1)
            self._check_length(mask, true, "pseudo/mask")
            confident = (mask > 0.5).long() * valid
        for kind in PSEUDO_KINDS:
            pred = logs.get(f"pseudo/{kind}")
            if pred is None:
                continue
            pred = pred.detach().to(self.device, non_blocking=True).reshape(-1).long()
            self._check_length(pred, true, f"pseudo/{kind}")
            index = base + pred.clamp(0, self.num_classes - 1)
            known = (pred >= 0).long()  # -1: no label yet (e.g. DASO before any queue fills)
            self._matrix(f"{kind}/all").index_add_(0, index, valid * known)
            if mask is not None:
                self._matrix(f"{kind}/confident").index_add_(0, index, confident * known)

    @staticmethod
    def _check_length(values: Tensor, true: Tensor, name: str) -> None:
        """Shapes are host metadata: checking them costs no sync."""
        if values.numel() != true.numel():
            raise ValueError(f"{name} has {values.numel()} entries, true labels {true.numel()}")

    def confusion(self) -> dict[str, np.ndarray]:
        """Current K x K confusion matrices on the host, keyed "kind/subset" (one transfer)."""
        if not self._confusion:
            return {}
        keys = list(self._confusion)
        # several processes: the sum of every process's counts (all must call this together)
        stacked = all_reduce_sum(torch.stack([self._confusion[k] for k in keys])).cpu().numpy()
        shape = (self.num_classes, self.num_classes)
        return {k: stacked[i].reshape(shape) for i, k in enumerate(keys)}

    def flush(self, step: int, class_names: Sequence[str] | None = None) -> list[dict]:
        """Per-class rows (source "pseudo") of everything seen since the last flush, then reset."""
        rows: list[dict] = []
        summary: dict[str, float] = {}
        for key, cm in sorted(self.confusion().items(), key=lambda kv: _order(kv[0])):
            if cm.sum() == 0:
                continue
            kind, subset = key.split("/")
            metrics = confusion_to_metrics(cm)
            rows += per_class_rows(step, "pseudo", kind, subset, metrics, class_names)
            summary.update(_summary(f"pseudo/{key}", metrics))
        self.last_summary = summary
        self.reset()
        return rows

    def reset(self) -> None:
        """Zero all accumulators."""
        for matrix in self._confusion.values():
            matrix.zero_()

    def state_dict(self) -> dict:
        """Accumulators on the CPU, for an exact resume."""
        return {"num_classes": self.num_classes,
                "confusion": {k: v.detach().cpu().clone() for k, v in self._confusion.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore accumulators saved by ``state_dict`` (onto this tracker's device)."""
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state has {state['num_classes']} classes, "
                             f"tracker {self.num_classes}")
        self._confusion = {k: torch.as_tensor(v, dtype=torch.int64).to(self.device).clone()
                           for k, v in state["confusion"].items()}


def _order(key: str) -> tuple[int, int]:
    """Sort "kind/subset" keys as linear, semantic, final and all, confident."""
    kind, subset = key.split("/")
    return PSEUDO_KINDS.index(kind), SUBSETS.index(subset)


def _summary(prefix: str, metrics: dict) -> dict[str, float]:
    """Scalar digest of one confusion matrix for metrics.jsonl (macro = scikit-learn's)."""
    return {
        f"{prefix}/acc": metrics["top1"],
        f"{prefix}/precision_macro": float(metrics["precision"].mean()),
        f"{prefix}/balanced_acc": metrics["balanced_acc"],
        f"{prefix}/count": float(metrics["support"].sum()),
    }


#: DASO's per-class state (the metrics of its ``per_class_diagnostics``), plotted by the report
REFINER_STATE = ("m_hat", "blend_weight")


def diagnostic_rows(step: int, parts: dict[str, dict[str, Tensor]],
                    class_names: Sequence[str] | None = None) -> list[dict]:
    """Per-class rows (source "refiner") of the pseudo-label components' published state:
    ``parts`` maps a component's kind to its ``per_class_diagnostics()`` (metric -> (K,))."""
    rows = []
    for kind, metrics in parts.items():
        if not metrics:
            continue
        with torch.no_grad():
            host = {m: v.detach().float().cpu().numpy() for m, v in metrics.items()}
        k = len(next(iter(host.values())))
        names = [str(n) for n in class_names] if class_names else [str(c) for c in range(k)]
        rows += [{"step": int(step), "source": "refiner", "kind": kind, "subset": "all",
                  "class": c, "class_name": names[c], "metric": metric,
                  "value": float(values[c])}
                 for c in range(k) for metric, values in host.items()]
    return rows


def refiner_rows(step: int, refiner, class_names: Sequence[str] | None = None) -> list[dict]:
    """Per-class rows (source "refiner") of one refiner's ``per_class_diagnostics()`` (DASO:
    ``m_hat`` and the blend weights ``v = m_hat^(1/T_dist) / max``, DASO Eqs. 5-6); [] for a
    refiner that publishes none."""
    return diagnostic_rows(step, {refiner.diagnostics_kind: refiner.per_class_diagnostics()},
                           class_names)
