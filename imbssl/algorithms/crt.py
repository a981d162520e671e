"""cRT: classifier re-training (Kang et al., ICLR 2020, "Decoupling Representation and
Classifier for Long-Tailed Recognition"), the post-training phase the DASO paper applies to
SSL learners (official DASO lib/algorithm/classifier_retraining.py).

The run starts from a finished run's checkpoint (``algorithm.init_from``): the network gets
its feature encoder and a freshly initialised classifier, the EMA network all of the
checkpoint's EMA weights (official ``rebuild_model``). Only the classifier trains, with
cross-entropy on labeled batches. As in the official code the encoder's batch-norm statistics
keep moving (the network stays in train mode) and the EMA network averages towards the
re-trained one.

Settings, each defaulting to the official code:

* ``sampler=class_aware``: the official ``ClassAwareSampler``
  (lib/dataset/loader/class_aware_sampler.py): i.i.d. draws with replacement, image i of
  class y weighted ``(1 - beta) / (1 - beta ** n_y)`` (the effective number of samples, Cui
  et al. 2019), ``sampler_beta`` 0.999 (its default and ``DATASET.SAMPLER_BETA``); with
  ``sampler_beta=1`` the weight is ``1 / n_y``, every class equally likely (Kang et al.'s
  class-balanced sampling). ``sampler=random`` is the official default ``RandomSampler``
  (epochs of shuffled images), which DASO's cRT runs with unless its config names
  ``ClassAwareSampler``: the official repository ships no cRT config (docs/experiments.md).
* ``eval_network=online``: evaluation reads the re-trained network itself, as the official
  ``SemiSupervised.evaluate`` does for cRT (``eval_model = self.model``); ``ema`` evaluates the
  EMA network as every other method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.base import Algorithm, AlgorithmConfig, Batch, StepState
from imbssl.errors import UserError

#: parameter-name prefix of the linear classifier in every backbone (``fc`` of small_cnn, WRN)
CLASSIFIER = "backbone.fc."


@dataclass
class CRTConfig(AlgorithmConfig):
    name: str = "crt"
    init_from: str = ""  # official ALGORITHM.CRT.TARGET_DIR: the SSL run (or checkpoint) to re-train
    reinit_classifier: bool = True  # official: only the encoder enters the trained network
    sampler: str = "class_aware"  # class_aware (official ClassAwareSampler) | random (RandomSampler)
    sampler_beta: float = 0.999  # official ClassAwareSampler beta / DATASET.SAMPLER_BETA (1: class-uniform)
    eval_network: str = "online"  # online (official cRT: eval_model = self.model) | ema


SAMPLERS = ("class_aware", "random")
EVAL_NETWORKS = ("online", "ema")


def class_aware_weights(labels: Tensor, beta: float) -> Tensor:
    """Per-image sampling weight of the official ``ClassAwareSampler``: ``(1 - beta) /
    (1 - beta ** n_y)`` for ``beta < 1``, ``1 / n_y`` for ``beta = 1`` (float64)."""
    counts = torch.bincount(labels.long().cpu()).double()
    if beta < 1:
        per_class = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64),
                                                    counts))
    else:
        per_class = 1.0 / counts
    return per_class[labels.long().cpu()]


class ClassAwareStream:
    """Endless labeled batches drawn i.i.d. with replacement with ``class_aware_weights``
    (official ``ClassAwareSampler``: ``torch.multinomial(weights, n, replacement=True)``).
    Same interface as imbssl.data.device_loader's streams; the generator is its whole state."""

    def __init__(self, dataset, batch_size: int, seed: int, device, beta: float):
        from imbssl.data.device_loader import _init_stream

        _init_stream(self, dataset, batch_size, seed, device)
        self.beta = float(beta)
        self.weights = class_aware_weights(dataset.labels.cpu(), self.beta)

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True,
                                generator=self.generator).to(self.device)
        return self.dataset.images[idx], self.dataset.labels[idx], idx

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.next()

    def __iter__(self) -> ClassAwareStream:
        return self

    def state_dict(self) -> dict:
        return {"sampling": "class_aware", "beta": self.beta,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != "class_aware" or float(state.get("beta", -1)) != self.beta:
            raise ValueError("saved stream is not class-aware with this beta")
        self.generator.set_state(torch.as_tensor(state["generator"]).cpu())


@dataclass(frozen=True)
class ClassAwareSampling:
    """``labeled_sampling`` value: make_stream builds a ``ClassAwareStream`` with ``beta``."""

    beta: float

    def make(self, dataset, batch_size: int, seed: int, device) -> ClassAwareStream:
        return ClassAwareStream(dataset, batch_size, seed, device, self.beta)


def is_classifier(name: str) -> bool:
    """Whether parameter/buffer ``name`` of a ``Network`` belongs to the linear classifier."""
    return name.startswith(CLASSIFIER)


@register("crt")
class CRT(Algorithm):
    """Class-balanced re-training of the classifier on a frozen encoder."""

    Config = CRTConfig

    def __init__(self, cfg: CRTConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        check_crt_config(cfg)
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)

    @property
    def labeled_sampling(self):
        if self.cfg.sampler == "random":
            return "shuffle"
        return ClassAwareSampling(self.cfg.sampler_beta)

    def eval_network(self, model: nn.Module, ema_model: nn.Module) -> nn.Module:
        return model if self.cfg.eval_network == "online" else ema_model

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


def check_crt_config(cfg: CRTConfig) -> None:
    """One-line errors for cRT settings that make no sense."""
    if cfg.sampler not in SAMPLERS:
        raise UserError(f"algorithm.sampler={cfg.sampler} is invalid: choose one of "
                        f"{', '.join(SAMPLERS)}")
    if not 0 < cfg.sampler_beta <= 1:
        raise UserError(f"algorithm.sampler_beta={cfg.sampler_beta} is invalid: it must be in "
                        "(0, 1] (official 0.999; 1: every class equally likely)")
    if cfg.eval_network not in EVAL_NETWORKS:
        raise UserError(f"algorithm.eval_network={cfg.eval_network} is invalid: choose one of "
                        f"{', '.join(EVAL_NETWORKS)}")


def _load_matching(module: nn.Module, saved: dict, keep) -> None:
    """Copy ``saved[k]`` into ``module`` for each of its own keys ``k`` that ``keep``; a
    missing key is a ``KeyError`` naming it."""
    own = module.state_dict()
    wanted = [k for k in own if keep(k)]
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise KeyError(f"the checkpoint has no {missing[0]}")
    module.load_state_dict({k: saved[k] for k in wanted}, strict=False)
