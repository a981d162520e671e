"""Pseudo-label refiners: components that sit between an algorithm's linear prediction on
the unlabeled weak view and the pseudo-label it trains on (DASO is one), plus any extra loss
they bring. Algorithms call the hooks below; ``IdentityRefiner`` makes every hook a no-op,
so an algorithm is the same code with or without DASO.

Call order inside ``Algorithm.step`` (where the algorithm has these quantities):
  1. ``algo.feed_refiner(batch, state)``: ``begin_step(batch, state)`` (the step's batch, e.g.
     its unlabeled indices ``batch.idx_ulb``, and the run's length: DARP keeps one
     pseudo-label per unlabeled image), then EMA-model features of the labeled batch
     -> ``update_labeled(features, labels)``
  2. ``refine(probs, features_weak, step)`` -> refined probabilities (B, K); ``probs`` are the
     linear (classifier) probabilities on the weak view, ``features_weak`` detached.
  3. ``observe(final_pseudo_labels)``: the final hard pseudo-labels of this step.
  4. ``extra_loss(features_weak, features_strong, step)`` -> (loss, logs) added to the total.
  5. ``pseudo_logs()`` -> the ``pseudo/...`` entries of this step (see algorithms/base.py).
Outside the step, the trainer calls ``algo.observe_validation(confusion)`` after each
validation evaluation, which passes the (true, predicted) count matrix to
``observe_validation`` (DARP's estimate of the unlabeled class distribution).

Diagnostics: after each evaluation the trainer logs ``per_class_diagnostics()`` of every
pseudo-label component of the algorithm (the refiner, distribution alignment) as per-class
rows of ``per_class.csv`` (source ``refiner``, kind ``diagnostics_kind``): DASO's ``m_hat``
and blend weights, DARP's target class counts, distribution alignment's target and running
mean. A component publishes its own state here; nothing reads its attributes by name.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class PerClassDiagnostics:
    """A pseudo-label component that publishes per-class state for ``per_class.csv``."""

    #: the ``kind`` column of its rows
    diagnostics_kind: str = "none"

    def per_class_diagnostics(self) -> dict[str, Tensor]:
        """metric name -> (K,) tensor, logged per class after each evaluation ({}: none)."""
        return {}


class IdentityRefiner(PerClassDiagnostics, nn.Module):
    """No refinement: pseudo-labels come from the classifier alone."""

    needs_labeled_features = False

    def begin_step(self, batch, state) -> None:
        pass

    def observe_validation(self, confusion: Tensor) -> None:
        pass

    def update_labeled(self, features: Tensor, labels: Tensor) -> None:
        pass

    def refine(self, probs: Tensor, features_weak: Tensor, step: int) -> Tensor:
        return probs

    def observe(self, pseudo_labels: Tensor) -> None:
        pass

    def extra_loss(self, features_weak: Tensor, features_strong: Tensor,
                   step: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        return None, {}

    def pseudo_logs(self) -> dict[str, Tensor]:
        return {}


def add_extra_loss(loss: Tensor, logs: dict[str, Tensor], extra: Tensor | None,
                   extra_logs: dict[str, Tensor]) -> Tensor:
    """Add a refiner's extra loss (if any) to ``loss`` and its logs to ``logs``."""
    logs.update(extra_logs)
    return loss if extra is None else loss + extra


def hard_labels(probs: Tensor) -> tuple[Tensor, Tensor]:
    """(max probability, argmax) of a (B, K) probability tensor."""
    conf, labels = torch.max(probs, dim=-1)
    return conf, labels
