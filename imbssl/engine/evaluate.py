"""Evaluation: a confusion matrix accumulated on the device, one host transfer at the end."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def confusion_matrix(model: nn.Module, images: Tensor, labels: Tensor, normalize,
                     num_classes: int, batch_size: int, autocast,
                     predict: Callable[[Any], Tensor] | None = None) -> Tensor:
    """K x K counts (rows: true class, columns: predicted) of ``model`` on uint8 ``images``;
    the prediction is the argmax of ``predict(model output)`` (the algorithm's
    ``eval_logits``: the classifier's logits unless the method says otherwise)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=images.device)
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size])
        with autocast():
            out = model(x)
            pred = (out.logits if predict is None else predict(out)).argmax(dim=1)
        y = labels[start:start + batch_size]
        counts += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    model.train(was_training)
    return counts.view(num_classes, num_classes)
