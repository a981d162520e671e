"""DARP: Distribution Aligning Refinery of Pseudo-labels (Kim et al., NeurIPS 2020).

DARP keeps the latest pseudo-label distribution of *every* unlabeled image and, every
``per_iters`` steps once ``warmup_ratio`` of the run is over, refines all of them at once by
the paper's convex program (Eq. 4)::

    min_M  sum_i w_i KL(M_i || P_i)   s.t.  sum_k M_ik = 1 (each image),
                                            sum_i M_ik = c_k (the target class counts),

with ``w_i = 1 / H(P_i)`` (Eq. 5: confident rows move less). The dual is solved by
coordinate ascent (paper Algorithm 1): the row constraint in closed form, the column
constraint per class by Newton's method. Between two refinements a step reads the stored
refined rows of its images. The host algorithm thresholds the refined rows as usual
(FixMatch: ``max >= 0.95``), so ``pseudo/final`` vs ``pseudo/linear`` shows, class by class,
what DARP changed.

Facts from the official code (DASO ``lib/algorithm/darp_reproduce.py``, "mostly copied" from
github.com/bbuing9/DARP; defaults ``lib/config/defaults.py`` ``ALGORITHM.DARP``):

* warm-up: no refinement while ``steps <= int(total_steps * WARMUP_RATIO)`` (0.4), the
  algorithm's own pseudo-labels are used; ``PER_ITERS = 10``; every step stores the
  incoming probabilities at the images' indices (``pseudo_orig[idx] = p``).
* before solving, ``estimate_pseudo``: for each class k the ``int(ALPHA * c_k)``
  (``ALPHA = 2``) images most confident in k get weight ``c_k / (sum of their p_k)``; the
  stored rows are multiplied by these weights (+1e-6) and renormalised, then solved; the
  unscaled rows are kept for the next refinement.
* the solver: ``NUM_DARP_ITERS = 10`` outer iterations; Newton per class (scipy
  ``optimize.newton``, ``maxiter=30``, ``tol=0.1`` on the step) started from the previous
  outer iteration's dual (0 at first); a final row normalisation, so rows sum to 1 exactly
  and class sums meet ``c`` to the Newton tolerance.
* the target ``c``: the unlabeled class counts when gamma_l = gamma_u (known by
  construction), else an estimate loaded from a file (``darp_estim/*.npyz``) made by a
  separate supervised run (``darp_estim.py``): ``q = C^-1 q~`` with ``C`` the validation
  confusion matrix of soft predictions (column-normalised) and ``q~`` the summed soft
  predictions on the unlabeled set, estimates with a negative entry or condition number
  >= ``THRESH_COND = 100`` rejected, the accepted ones averaged, scaled to the unlabeled size.

Two stages for the mismatched settings, as the official code (``target=file``, the default of
``pseudo=darp_estim``): a labeled-only estimation run (``algorithm=darp_estim``,
imbssl/algorithms/darp_estim.py; official ``darp_estim.py``) writes the estimate, and the SSL
run loads it by path (``pseudo.estimate_file``; official ``ALGORITHM.DARP.EST`` +
``darp_reproduce.get_target_dist``). The file is NumPy's ``.npy`` format under any name, so
the official published ``darp_estim/*.npyz`` files load as they are; the target is
``N_u * q / sum(q)`` (official ``sum(ul_samples_per_class) * est_dist / np.sum(est_dist)``).

Differences (docs/experiments.md, "DARP"):

* ``target=labeled`` (default) scales the labeled class frequencies to the unlabeled set
  size instead of reading the true unlabeled counts: the same when gamma_l = gamma_u, and no
  label of the unlabeled set is used.
* ``target=estimate`` (imbssl's own single-run variant, not official) estimates within the
  SSL run: every validation
  evaluation (the trainer's, hard predictions of the EMA model) gives ``C`` and the stored
  predictions of the unlabeled images seen so far give ``q~`` (their argmax histogram,
  scaled to the whole set); accepted estimates (no negative entry, condition < 100) are
  averaged, and until one is accepted the labeled target is used.
* everything runs in torch on the training device (float64 for the solver), and all
  state is in buffers (the schedule follows the step number), so a checkpoint resumes
  exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from imbssl.collectives import all_gather_cat
from imbssl.pseudo.base import IdentityRefiner

TARGETS = ("labeled", "estimate", "uniform", "file")


@dataclass
class DARPConfig:
    """Hydra schema of ``pseudo=darp`` (registered as ``pseudo/darp_schema``)."""

    name: str = "darp"
    warmup_ratio: float = 0.4  # official ALGORITHM.DARP.WARMUP_RATIO (DARP repo --warm 200/500 epochs)
    per_iters: int = 10        # official ALGORITHM.DARP.PER_ITERS (refine every 10 steps)
    alpha: float = 2.0         # official ALGORITHM.DARP.ALPHA (DARP repo --alpha 2.0)
    num_darp_iters: int = 10   # official ALGORITHM.DARP.NUM_DARP_ITERS (DARP repo --iter_T 10)
    target: str = "labeled"    # labeled | file | estimate | uniform (see the module docstring)
    estimate_file: str = ""    # target=file: the estimation run's estimate (official ALGORITHM.DARP.EST)
    thresh_cond: float = 100.0  # official ALGORITHM.DARP_ESTIM.THRESH_COND (estimate only)


def row_entropy(p: Tensor) -> Tensor:
    """H(P_i) = -sum_k p_ik log(p_ik + 1e-6) (official ``opt_solver``), floored at 1e-6."""
    return (-(p * torch.log(p + 1e-6)).sum(dim=1)).clamp_min(1e-6)


def _newton_duals(b: Tensor, w: Tensor, c: Tensor, nu: Tensor, iters: int = 30,
                  tol: float = 0.1) -> Tensor:
    """Solve sum_i b_ik exp(-nu_k / w_i) = c_k for every k by Newton's method from ``nu``
    (all classes at once; a class stops once its step is below ``tol``, as scipy's newton)."""
    done = torch.zeros_like(c, dtype=torch.bool)
    inv_w = (1.0 / w)[:, None]
    for _ in range(iters):
        e = b * torch.exp(-nu[None, :] * inv_w)
        g = e.sum(0) - c
        dg = -(e * inv_w).sum(0)
        step = torch.where(done | (dg == 0), torch.zeros_like(g), g / dg)
        nu = nu - step
        done = done | (step.abs() < tol)
        if bool(done.all()):
            break
    return nu


@torch.no_grad()
def darp_solve(probs: Tensor, target: Tensor, num_iters: int = 10) -> Tensor:
    """DARP's program (paper Eq. 4, Algorithm 1): the (N, K) rows closest to ``probs`` in
    entropy-weighted KL whose rows sum to 1 and whose columns sum to ``target`` (K,)."""
    p, c = probs.double(), target.to(probs.device).double()
    w = row_entropy(p).reciprocal()  # w_i = 1 / H(P_i)  (Eq. 5)
    a = p / math.e
    nu = torch.zeros_like(c)
    for _ in range(num_iters):
        y = torch.exp(-nu[None, :] / w[:, None])
        x = 1.0 / (a * y).sum(1)  # lambda step: rows sum to 1
        nu = _newton_duals(a * x[:, None], w, c, nu)  # nu step: columns sum to c
    y = torch.exp(-nu[None, :] / w[:, None])
    m = a * y
    return (m / m.sum(1, keepdim=True)).to(probs.dtype)


def confident_rescale(probs: Tensor, target: Tensor, alpha: float) -> Tensor:
    """Official ``estimate_pseudo`` + rescale: rows among the ``int(alpha * c_k)`` most
    confident in class k get weight ``c_k / sum of their p_k`` on class k (0 elsewhere),
    then ``p * weight + 1e-6`` renormalised."""
    n, k = probs.shape
    num = (alpha * target).long().clamp_max(n)  # int(): the counts are non-negative
    order = probs.argsort(dim=0, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(n, device=probs.device)[:, None].expand(n, k))
    chosen = (rank < num[None, :]).to(probs.dtype)
    k_probs = (probs * chosen).sum(0)
    weights = (target + 1e-6) / (k_probs + 1e-6)
    scaled = probs * chosen * weights[None, :] + 1e-6
    return scaled / scaled.sum(1, keepdim=True)


def estimate_distribution(confusion: Tensor, predicted_counts: Tensor
                          ) -> tuple[Tensor, float]:
    """Black-box shift estimate ``q = C^-1 q~`` (official ``darp_estim.estimate_q_y``) from a
    (true, predicted) confusion matrix and the predicted class counts of the unlabeled set;
    returns (q, condition number of C)."""
    conf = confusion.double().t()  # C[i, j]: predicted i, true j
    conf = conf / conf.sum(0, keepdim=True).clamp_min(1e-12)  # columns: p(pred | true)
    cond = float(torch.linalg.cond(conf))
    if not math.isfinite(cond):
        return torch.full_like(predicted_counts.double(), float("nan")), cond
    return torch.linalg.solve(conf, predicted_counts.double()), cond


def load_estimate(path: str, num_classes: int, num_unlabeled: int) -> Tensor:
    """The target class counts from an estimate file: ``N_u * q / sum(q)`` (official
    ``get_target_dist``); ``q`` is a (K,) array in NumPy's ``.npy`` format, whatever the file
    is called (the official ``darp_estim/*.npyz`` files are ``.npy`` files)."""
    import numpy as np

    if not path:
        raise ValueError("pseudo.target=file needs pseudo.estimate_file: the estimate an "
                         "algorithm=darp_estim run wrote (or an official darp_estim/*.npyz)")
    try:
        q = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"pseudo.estimate_file={path} cannot be read as a NumPy array "
                         f"({type(exc).__name__}: {str(exc)[:120]})") from None
    q = torch.as_tensor(np.asarray(q, dtype=np.float64)).flatten()
    if q.numel() != num_classes or not bool(torch.isfinite(q).all()) or bool((q < 0).any()) \
            or float(q.sum()) <= 0:
        raise ValueError(f"pseudo.estimate_file={path} holds {q.numel()} values; it must hold "
                         f"{num_classes} finite non-negative class sizes, not all zero")
    return q * num_unlabeled / q.sum()


class DARP(IdentityRefiner):
    """Pseudo-label refiner over the whole unlabeled set; see the module docstring."""

    diagnostics_kind = "darp"

    def __init__(self, num_classes: int, num_unlabeled: int, labeled_counts, *,
                 warmup_ratio: float = 0.4, per_iters: int = 10, alpha: float = 2.0,
                 num_darp_iters: int = 10, target: str = "labeled",
                 thresh_cond: float = 100.0, estimate_file: str = ""):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"pseudo.target must be one of {TARGETS}, got {target!r}")
        if not 0 <= warmup_ratio <= 1:
            raise ValueError(f"pseudo.warmup_ratio must be in [0, 1], got {warmup_ratio}")
        if per_iters < 1 or num_darp_iters < 1:
            raise ValueError("pseudo.per_iters and pseudo.num_darp_iters must be >= 1")
        self.num_classes, self.num_unlabeled = int(num_classes), int(num_unlabeled)
        self.warmup_ratio, self.per_iters, self.alpha = warmup_ratio, int(per_iters), alpha
        self.num_darp_iters, self.target, self.thresh_cond = int(num_darp_iters), target, thresh_cond
        n, k = self.num_unlabeled, self.num_classes
        counts = torch.as_tensor(labeled_counts, dtype=torch.float64)
        if target == "uniform":
            counts = torch.ones(k, dtype=torch.float64)
        if target == "file":
            counts = load_estimate(estimate_file, k, n)
        self.register_buffer("base_target", counts / counts.sum() * n)  # c before any estimate
        self.register_buffer("pseudo_orig", torch.full((n, k), 1.0 / k))    # latest p per image
        self.register_buffer("pseudo_refine", torch.full((n, k), 1.0 / k))  # latest DARP rows
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("estimate_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("estimate_count", torch.zeros((), dtype=torch.long))
        # this step's unlabeled indices, 0-based step and the run's length (begin_step)
        self._indices: Tensor | None = None
        self._step, self._total_steps = 0, 0

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, num_unlabeled: int,
                    labeled_counts) -> DARP:
        values = {f.name: getattr(cfg, f.name, f.default) for f in fields(DARPConfig)}
        values.pop("name")
        return cls(num_classes, num_unlabeled, labeled_counts, **values)

    # ------------------------------------------------------------------ engine hooks
    def begin_step(self, batch, state) -> None:
        """Engine hook: this step's unlabeled image indices, step and the run's length."""
        self._indices = batch.idx_ulb
        self._step, self._total_steps = int(state.step), int(state.total_steps)

    def observe_validation(self, confusion: Tensor) -> None:
        """``target=estimate``: one more estimate of the unlabeled class counts from this
        validation confusion matrix and the stored predictions (kept if accepted)."""
        if self.target != "estimate" or not bool(self.seen.any()):
            return
        pred = self.pseudo_orig[self.seen].argmax(1)
        counts = torch.bincount(pred, minlength=self.num_classes).double()
        counts = counts * self.num_unlabeled / counts.sum()
        q, cond = estimate_distribution(confusion.to(counts.device), counts)
        if cond < self.thresh_cond and bool((q >= 0).all()):
            self.estimate_sum += q * self.num_unlabeled / q.sum()
            self.estimate_count += 1

    def target_counts(self) -> Tensor:
        """c: the averaged accepted estimate (``target=estimate``), else ``base_target``."""
        if self.target == "estimate" and int(self.estimate_count) > 0:
            return self.estimate_sum / self.estimate_count
        return self.base_target

    def per_class_diagnostics(self) -> dict[str, Tensor]:
        """The target class counts ``c`` the solver matches (DARP Eq. 3)."""
        return {"target_count": self.target_counts()}

    def warmup_steps(self, total_steps: int) -> int:
        """Steps without refinement: ``int(total_steps * warmup_ratio)`` (official)."""
        return int(total_steps * self.warmup_ratio)

    def solves_at(self, step: int, total_steps: int) -> bool:
        """Whether 0-based ``step`` re-solves: after the warm-up, at every multiple of
        ``per_iters`` of the official counter ``total_steps = step + 1`` (official ``step``:
        ``if self.total_steps % self.per_iters == 0``); until the first solve the refined
        rows are the initial uniform ones, as in the official code."""
        count = step + 1
        return count > self.warmup_steps(total_steps) and count % self.per_iters == 0

    @torch.no_grad()
    def refine_indexed(self, probs: Tensor, indices: Tensor, step: int,
                       total_steps: int) -> Tensor:
        """Store ``probs`` at ``indices``; after warm-up return the refined rows of these
        images (re-solved every ``per_iters`` steps; uniform until the first solve, as the
        official ``pseudo_refine``), before it ``probs`` itself. The schedule follows the step
        number, so no counter syncs the host."""
        idx = all_gather_cat(indices).to(self.pseudo_orig.device).long()
        self.pseudo_orig.index_copy_(0, idx, all_gather_cat(probs.float()))
        self.seen.index_fill_(0, idx, True)
        if step + 1 <= self.warmup_steps(total_steps):
            return probs
        if self.solves_at(step, total_steps):
            self.solve()
        return self.pseudo_refine[indices.to(self.pseudo_refine.device).long()].to(probs)

    @torch.no_grad()
    def solve(self) -> None:
        """Refine every stored row (official ``step`` at a multiple of ``PER_ITERS``)."""
        target = self.target_counts().to(self.pseudo_orig.device)
        scaled = confident_rescale(self.pseudo_orig.double(), target, self.alpha)
        self.pseudo_refine.copy_(darp_solve(scaled, target, self.num_darp_iters))

    def refine(self, probs: Tensor, features_weak: Tensor, step: int) -> Tensor:
        """Engine hook: ``refine_indexed`` at the indices given by ``begin_step``."""
        if self._indices is None:
            raise RuntimeError("DARP needs the unlabeled indices: the algorithm must call "
                               "feed_refiner(batch, state) before refine")
        out = self.refine_indexed(probs, self._indices, self._step, self._total_steps)
        self._indices = None
        return out
