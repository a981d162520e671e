"""DARP's estimation stage (Kim et al., NeurIPS 2020, Sec. 3.3; official DASO
``lib/algorithm/darp_estim.py``, from github.com/bbuing9/DARP ``train_base_estim.py``): a
labeled-only run that estimates the class distribution of the unlabeled set for DARP in the
mismatched settings, and writes it for the SSL run (``pseudo=darp_estim
pseudo.estimate_file=...``, imbssl/pseudo/darp.py).

Training is the supervised baseline's (labeled cross-entropy). After every evaluation the
*online* network (official: ``estimate_q_y(..., self.model, ...)``) predicts the validation and
the unlabeled sets (softmax, eval mode), and black-box shift estimation (Lipton et al. 2018)
gives

    C[:, y] = sum of p(x) over validation images of class y, each column normalised,
    q~      = sum of p(u) over the unlabeled images,          q = C^-1 q~,

(official ``confusion`` / ``estimate_q_y``). An estimate is accepted when no entry is negative
and ``cond(C) < thresh_cond`` (official ``THRESH_COND`` 100); the written estimate is the mean
of the accepted ones (official ``final_q / n_infer`` saved as ``estim.npy`` after training;
here rewritten after every accepted estimate, so a stopped run leaves its estimate so far).
The file is NumPy's ``.npy`` format, the format of the official ``darp_estim/*.npyz``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from imbssl.algorithms import register
from imbssl.algorithms.base import AlgorithmConfig
from imbssl.algorithms.supervised import Supervised
from imbssl.errors import UserError


@dataclass
class DARPEstimConfig(AlgorithmConfig):
    name: str = "darp_estim"
    thresh_cond: float = 100.0  # official ALGORITHM.DARP_ESTIM.THRESH_COND
    estimate_file: str = "darp_estim.npyz"  # where the estimate is written (configs: in run_dir)


def soft_confusion(probs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) ``C[:, y] += p(x)`` over the images of true class ``y`` (official
    ``confusion``: rows predicted, columns true), in float64."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=probs.device)
    conf.index_add_(1, labels.long(), probs.double().t())
    return conf


def estimate_unlabeled_counts(valid_probs: Tensor, valid_labels: Tensor,
                              unlabeled_probs: Tensor) -> tuple[Tensor, float]:
    """Official ``estimate_q_y``: (q = C^-1 q~, cond(C)) with ``C`` the column-normalised
    soft confusion of the validation set and ``q~`` the summed unlabeled predictions."""
    k = valid_probs.shape[1]
    conf = soft_confusion(valid_probs, valid_labels, k)
    conf = conf / conf.sum(0, keepdim=True)
    cond = float(torch.linalg.cond(conf))
    q_tilde = unlabeled_probs.double().sum(0)
    if not math.isfinite(cond):
        return torch.full_like(q_tilde, float("nan")), cond
    return torch.linalg.inv(conf) @ q_tilde, cond


def accepted(q: Tensor, cond: float, thresh_cond: float) -> bool:
    """Official acceptance: no negative entry and ``cond < THRESH_COND``."""
    return bool(torch.isfinite(q).all()) and not bool((q < 0).any()) and cond < thresh_cond


@register("darp_estim")
class DARPEstim(Supervised):
    """The supervised baseline that estimates the unlabeled class distribution at every
    evaluation and writes the mean of the accepted estimates."""

    Config = DARPEstimConfig
    needs_validation = True  # official PER_CLASS_VALID_SAMPLES: the estimate's confusion

    def __init__(self, cfg: DARPEstimConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        if cfg.thresh_cond <= 1:
            raise UserError(f"algorithm.thresh_cond={cfg.thresh_cond} is invalid: a condition "
                            "number is >= 1 (official 100)")
        if not cfg.estimate_file:
            raise UserError("algorithm.estimate_file is empty: name the file the estimate is "
                            "written to (default: RUN/darp_estim.npyz)")
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        self.register_buffer("estimate_sum", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("estimate_count", torch.zeros((), dtype=torch.long))

    def eval_network(self, model: nn.Module, ema_model: nn.Module) -> nn.Module:
        return model  # official DARP_ESTIM.evaluate: eval_loop(self.model, ...)

    def observe_evaluation(self, soft_predictions) -> None:
        valid = soft_predictions("valid")
        if valid is None:  # the trainer refuses such a run (needs_validation)
            return
        unlabeled, _ = soft_predictions("unlabeled")
        q, cond = estimate_unlabeled_counts(valid[0], valid[1], unlabeled)
        if accepted(q, cond, self.cfg.thresh_cond):
            self.estimate_sum += q.to(self.estimate_sum.device)
            self.estimate_count += 1
            self.write_estimate()

    def estimate(self) -> Tensor | None:
        """Mean of the accepted estimates (official ``final_q / n_infer``), None before one."""
        n = int(self.estimate_count)
        return self.estimate_sum / n if n else None

    def write_estimate(self) -> None:
        from imbssl.collectives import rank

        q = self.estimate()
        if q is None or rank() != 0:
            return
        import numpy as np

        path = Path(self.cfg.estimate_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # np.save would append ".npy" to a path object's name
            np.save(fh, q.float().cpu().numpy())  # official: np.save(..., np.array(final_q))
