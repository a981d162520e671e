"""Evaluation: confusion matrices accumulated on the device, one host transfer at the end."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Predictor = Callable[[Any], Tensor]  # model output -> logits to argmax


@torch.no_grad()
def confusion_matrices(model: nn.Module, images: Tensor, labels: Tensor, normalize,
                       num_classes: int, batch_size: int, autocast,
                       predictors: Sequence[Predictor]) -> Tensor:
    """(P, K, K) counts (rows: true class, columns: predicted) of ``model`` on uint8
    ``images``, one matrix per predictor, all from one forward pass per batch: prediction
    ``p`` is the argmax of ``predictors[p](model output)``."""
    was_training = model.training
    model.eval()
    k, p = num_classes, len(predictors)
    counts = torch.zeros(p, k * k, dtype=torch.long, device=images.device)
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size])
        y = labels[start:start + batch_size]
        with autocast():
            out = model(x)
            preds = [predict(out).argmax(dim=1) for predict in predictors]
        for i, pred in enumerate(preds):
            counts[i] += torch.bincount(y * k + pred, minlength=k * k)
    model.train(was_training)
    return counts.view(p, k, k)


def confusion_matrix(model: nn.Module, images: Tensor, labels: Tensor, normalize,
                     num_classes: int, batch_size: int, autocast,
                     predict: Predictor | None = None) -> Tensor:
    """K x K counts of ``model`` on uint8 ``images``; the prediction is the argmax of
    ``predict(model output)`` (the algorithm's ``eval_logits``: the classifier's logits unless
    the method says otherwise)."""
    predict = predict if predict is not None else (lambda out: out.logits)
    return confusion_matrices(model, images, labels, normalize, num_classes, batch_size,
                              autocast, [predict])[0]


def labeled_log_prior(labeled_labels: Tensor, num_classes: int) -> Tensor | None:
    """log pi: log class frequencies of the labeled set; None when a class has no labeled
    image (log 0 would make the adjusted prediction that class for every image)."""
    counts = torch.bincount(labeled_labels.long().flatten(), minlength=num_classes).float()
    if bool((counts == 0).any()):
        return None
    return (counts / counts.sum()).log()


def posthoc_la_predictor(log_prior: Tensor, tau: float = 1.0) -> Predictor:
    """Post-hoc logit adjustment of the classifier's logits (Menon et al., ICLR 2021, Eq. 9):
    ``f(x) - tau log pi``; official DASO ``eval_loop``: ``outputs - p_data.log()`` (tau 1)."""
    offset = tau * log_prior
    return lambda out: out.logits.float() - offset.to(out.logits.device)


def measured_confusions(model: nn.Module, images: Tensor, labels: Tensor, normalize,
                        num_classes: int, batch_size: int, autocast, predict: Predictor,
                        labeled_labels: Tensor) -> Tensor:
    """What each evaluation counts: (2, K, K) confusions of the evaluated prediction
    (``predict``) and of the post-hoc logit-adjusted classifier logits (tau 1, pi of
    ``labeled_labels``, the labeled set now); (1, K, K) when a class has no labeled image."""
    predictors = [predict]
    log_prior = labeled_log_prior(labeled_labels, num_classes)
    if log_prior is not None:
        predictors.append(posthoc_la_predictor(log_prior))
    return confusion_matrices(model, images, labels, normalize, num_classes, batch_size,
                              autocast, predictors)
