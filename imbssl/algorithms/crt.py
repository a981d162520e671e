"""cRT: classifier re-training (Kang et al., ICLR 2020, "Decoupling Representation and
Classifier for Long-Tailed Recognition"), the post-training phase the DASO paper applies to
SSL learners (official DASO lib/algorithm/classifier_retraining.py).

The run starts from a finished run's checkpoint (``algorithm.init_from``): the network gets
its feature encoder and a freshly initialised classifier, the EMA network all of the
checkpoint's EMA weights (official ``rebuild_model``). Only the classifier trains, with
cross-entropy on labeled batches sampled class-balanced (a class uniformly, then one of its
images). As in the official code the encoder's batch-norm statistics keep moving (the network
stays in train mode) and the EMA network averages towards the re-trained one.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState

#: parameter-name prefix of the linear classifier in every backbone (``fc`` of small_cnn, WRN)
CLASSIFIER = "backbone.fc."


@dataclass
class CRTConfig(AlgorithmConfig):
    name: str = "crt"
    init_from: str = ""  # official ALGORITHM.CRT.TARGET_DIR: the SSL run (or checkpoint) to re-train
    reinit_classifier: bool = True  # official: only the encoder enters the trained network


def is_classifier(name: str) -> bool:
    """Whether parameter/buffer ``name`` of a ``Network`` belongs to the linear classifier."""
    return name.startswith(CLASSIFIER)


@register("crt")
class CRT(Algorithm):
    """Class-balanced re-training of the classifier on a frozen encoder."""

    Config = CRTConfig
    labeled_sampling = "class_balanced"

    @property
    def init_from(self) -> str:
        return self.cfg.init_from

    def load_init_weights(self, model: nn.Module, ema_model: nn.Module, state: dict) -> None:
        """Network: the checkpoint's encoder (+ its classifier unless re-initialised); EMA
        network: all of the checkpoint's EMA weights. Heads of the SSL method are dropped."""
        keep = (lambda k: not is_classifier(k)) if self.cfg.reinit_classifier else (lambda k: True)
        _load_matching(model, state["model"], keep)
        _load_matching(ema_model, state["ema"], lambda k: True)

    def configure_network(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(is_classifier(name))

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        logits = state.model(batch.x_lb).logits
        loss = F.cross_entropy(logits.float(), batch.y_lb)  # official cRT run_step l_loss
        return loss, {"loss/labeled": loss.detach()}


def _load_matching(module: nn.Module, saved: dict, keep) -> None:
    """Copy ``saved[k]`` into ``module`` for each of its own keys ``k`` that ``keep``; a
    missing key is a ``KeyError`` naming it."""
    own = module.state_dict()
    wanted = [k for k in own if keep(k)]
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise KeyError(f"the checkpoint has no {missing[0]}")
    module.load_state_dict({k: saved[k] for k in wanted}, strict=False)
