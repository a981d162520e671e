"""CReST and CReST+ (Wei et al., CVPR 2021): FixMatch in generations of self-training.

Training is split into ``generations`` equal phases. After each one but the last, the EMA
model labels the whole unlabeled set; of the images predicted as class k, the most confident
fraction ``mu_k`` joins the initial labeled set with that pseudo-label (CReST Sec. 3.2),

    mu_k = (N_{K+1-k'} / N_1) ** (1 / alpha)       (official DASO lib/algorithm/fm_crest.py)

where k' is k's rank (1 = most labeled) when classes are sorted by labeled frequency, so the
rarest class is taken at rate 1 and the head class at (N_K / N_1) ** (1/alpha). The CReST paper
writes the exponent as alpha (its alpha = 1/3 on CIFAR-10-LT); the official DASO config writes
ALPHA: 3 with exponent 1/ALPHA. We keep the official convention: ``alpha`` = 3 here is the
paper's alpha = 1/3. Each generation restarts network, EMA, optimizer and schedule (official
``new_generation``); the selection replaces the previous generation's additions.

CReST+ adds progressive distribution alignment (CReST Sec. 3.3): the alignment target is the
labeled distribution tempered by t, p(y)^t / sum p(y)^t, with t going linearly from 1 in the
first generation to ``t_min`` in the last (official ``gradual_temp``).

The learner of each generation is FixMatch (``algorithm.base=fixmatch``, official
``fm_crest.py``) or ReMixMatch (``algorithm.base=remixmatch``, official ``rm_crest.py``): the
same selection and restarts; ReMixMatch's own distribution alignment takes the tempered target
(official ``dist_align(p, temperature=gradual_temp)``) and its consistency ramp-up restarts with
each generation (official ``cons_rampup_func``: the step within the generation).

With ``logit_adjust=loss`` the prior of LA's labeled loss is the *current* labeled set's class
frequencies: after each generation's additions it is recomputed from the initial labeled set
plus the pseudo-labeled images (official ``fm_crest.py`` ``run_step``: ``current_label_dist``
of the rebuilt labeled set). Post-hoc adjustment and the alignment target keep the initial
labeled distribution, as the official ``p_data`` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from imbssl.algorithms import register
from imbssl.algorithms.base import Batch, LabeledSetUpdate, StepState, logit_adjustment
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig
from imbssl.algorithms.ops import linear_rampup
from imbssl.algorithms.remixmatch import ReMixMatch, ReMixMatchConfig
from imbssl.errors import UserError

BASES = ("fixmatch", "remixmatch")


@dataclass
class CReSTConfig(FixMatchConfig):
    name: str = "crest"
    base: str = "fixmatch"  # the SSL learner of each generation (official fm_crest.py)
    generations: int = 5  # official: MAX_ITER 250000 / GEN_PERIOD_STEPS 50000
    alpha: float = 3.0  # official ALPHA (exponent 1/alpha; CReST paper's alpha = 1/3)
    progressive_align: bool = False  # CReST+ only (official PROGRESSIVE_ALIGN)
    t_min: float = 0.5  # official TMIN; CReST paper Sec. 3.3 (CIFAR-10-LT)
    # ReMixMatch's own values, used with base=remixmatch (official remixmatch_crest.yaml)
    temperature: float = ReMixMatchConfig.temperature
    mixup_alpha: float = ReMixMatchConfig.mixup_alpha
    lambda_kl: float = ReMixMatchConfig.lambda_kl
    lambda_rot: float = ReMixMatchConfig.lambda_rot
    rampup_ratio: float = ReMixMatchConfig.rampup_ratio  # of each generation (official)
    passes: str = ReMixMatchConfig.passes


@dataclass
class CReSTPlusConfig(CReSTConfig):
    name: str = "crest_plus"
    dist_align: str = "labeled"  # official fixmatch_crest.yaml MODEL.DIST_ALIGN.APPLY True
    progressive_align: bool = True  # official fixmatch_crest.yaml PROGRESSIVE_ALIGN True


def selection_rates(labeled_counts: Tensor, alpha: float) -> Tensor:
    """mu per class (class-index order): the class of frequency rank r (0 = most labeled)
    gets (N_(K-1-r) / N_(0)) ** (1/alpha), N_(j) the j-th largest labeled count."""
    counts = labeled_counts.double()
    order = torch.argsort(-counts, stable=True)  # classes by descending labeled count
    sorted_counts = counts[order]
    rates = torch.empty_like(counts)
    rates[order] = (sorted_counts.flip(0) / sorted_counts[0]).pow(1.0 / alpha)
    return rates.float()


def select_pseudo_labeled(probs: Tensor, rates: Tensor) -> tuple[Tensor, Tensor]:
    """(indices, pseudo-labels) of the floor(mu_k * n_k) most confident images predicted as
    class k, for every k (official ``_rebuild_labeled_dataset``)."""
    conf, pred = probs.max(dim=1)
    indices, labels = [], []
    for k in range(probs.shape[1]):
        members = torch.nonzero(pred == k).flatten()
        take = int(float(rates[k]) * len(members))
        if take < 1:
            continue
        ranked = torch.argsort(conf[members], descending=True, stable=True)
        indices.append(members[ranked[:take]])
        labels.append(torch.full((take,), k, dtype=torch.long, device=probs.device))
    if not indices:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return empty, empty.clone()
    return torch.cat(indices), torch.cat(labels)


def labeled_set_prior(initial_counts: Tensor, added_labels: Tensor) -> Tensor:
    """p(y) of the labeled set after an update: the initial counts plus the pseudo-labels of
    the added images, normalised (official ``current_label_dist(normalize="sum")``)."""
    counts = initial_counts.double() + torch.bincount(
        added_labels.long().cpu(), minlength=len(initial_counts)).to(initial_counts.device)
    return (counts / counts.sum()).float()


def generation_bounds(step: int, total: int, generations: int) -> tuple[int, int, int]:
    """(0-based generation, its first step, its length) at ``step``; the last generation also
    takes the steps ``total`` does not divide evenly."""
    period = max(total // generations, 1)
    gen = min(step // period, generations - 1)
    start = gen * period
    length = period if gen < generations - 1 else total - start
    return gen, start, length


def gradual_temperature(gen: int, generations: int, t_min: float) -> float:
    """Distribution-alignment temperature of 0-based generation ``gen``: 1 -> t_min linearly."""
    if generations == 1:
        return 1.0
    f = gen / (generations - 1)
    return 1.0 - f + f * t_min


def check_crest_config(cfg: CReSTConfig) -> None:
    """One-line errors for CReST settings that make no sense."""
    if cfg.base == "supervised":
        raise UserError("CReST self-trains on pseudo-labels of the unlabeled set, which the "
                        "supervised baseline does not use; use algorithm.base=fixmatch")
    if cfg.base not in BASES:
        raise UserError(f"algorithm.base={cfg.base} is not available for CReST; use one of "
                        f"{BASES}")
    if cfg.generations < 1:
        raise UserError(f"algorithm.generations={cfg.generations} must be >= 1")
    if cfg.alpha <= 0:
        raise UserError(f"algorithm.alpha={cfg.alpha} must be > 0 (official ALPHA: 3)")
    if cfg.progressive_align and cfg.dist_align != "labeled":
        raise UserError("algorithm.progressive_align=true tempers the labeled distribution "
                        "as the alignment target; set algorithm.dist_align=labeled")


class Generations:
    """The CReST hooks, mixed into the learner of each generation (FixMatch or ReMixMatch)."""

    def _init_generations(self, labeled_labels: Tensor) -> None:
        counts = torch.bincount(labeled_labels.long().cpu(), minlength=self.num_classes)
        self.register_buffer("selection_rate", selection_rates(counts, self.cfg.alpha),
                             persistent=False)
        self.register_buffer("initial_labeled_counts", counts.float(), persistent=False)

    def phase(self, step: int, total: int) -> tuple[int, int]:
        _, start, length = generation_bounds(step, total, self.cfg.generations)
        return step - start, length

    def labeled_update_due(self, step: int, total: int) -> bool:
        gen, start, _ = generation_bounds(step, total, self.cfg.generations)
        return 0 < step < total and step == start and gen > 0

    def update_labeled_set(self, unlabeled_probs: Tensor, step: int,
                           total: int) -> LabeledSetUpdate:
        rates = self.selection_rate.to(unlabeled_probs.device)
        indices, labels = select_pseudo_labeled(unlabeled_probs, rates)
        self.follow_labeled_set(labels)
        return LabeledSetUpdate(indices, labels, restart=True)

    def follow_labeled_set(self, added_labels: Tensor) -> None:
        """LA's loss prior from the labeled set as it is now (official ``fm_crest.py``:
        ``tau * current_label_dist().log()``); only ``logit_adjust=loss`` reads it."""
        if getattr(self.cfg, "logit_adjust", "none") != "loss":
            return
        prior = labeled_set_prior(self.initial_labeled_counts, added_labels)
        self.la_offset.copy_(logit_adjustment(prior.to(self.la_offset.device), self.cfg.la_tau))

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        gen, _, _ = generation_bounds(state.step, state.total_steps, self.cfg.generations)
        temperature = 1.0
        if self.cfg.progressive_align:
            temperature = gradual_temperature(gen, self.cfg.generations, self.cfg.t_min)
            target = self.labeled_prior.pow(temperature)
            self.dist_align.target.copy_(target / target.sum())
        loss, logs = super().step(batch, state)
        device = loss.device
        logs["crest/generation"] = torch.tensor(float(gen + 1), device=device)
        logs["crest/da_temperature"] = torch.tensor(temperature, device=device)
        return loss, logs


class ReMixMatchCReST(Generations, ReMixMatch):
    """ReMixMatch as the learner of each CReST generation (official ``rm_crest.py``): the class
    ``algorithm=crest`` trains with ``algorithm.base=remixmatch`` (see ``crest_learner``)."""

    Config = CReSTConfig
    registered_name = "crest"

    def __init__(self, cfg: CReSTConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        check_crest_config(cfg)
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        self._init_generations(labeled_labels)

    def consistency_ramp(self, state: StepState) -> float:
        """The ramp-up restarts with each generation (official ``cons_rampup_func``)."""
        phase_step, phase_total = self.phase(state.step, state.total_steps)
        return linear_rampup(phase_step, phase_total, self.cfg.rampup_ratio)


class ReMixMatchCReSTPlus(ReMixMatchCReST):
    """CReST+ on ReMixMatch (DASO Table 13's "ReMixMatch w/ CReST+")."""

    Config = CReSTPlusConfig
    registered_name = "crest_plus"


def crest_learner(cfg: CReSTConfig) -> type:
    """The class ``algorithm=crest`` trains with: CReST's generations around the base learner
    ``cfg.base`` (FixMatch: ``CReST``; ReMixMatch: ``ReMixMatchCReST``)."""
    return ReMixMatchCReST if cfg.base == "remixmatch" else CReST


def crest_plus_learner(cfg: CReSTPlusConfig) -> type:
    """The class ``algorithm=crest_plus`` trains with (as ``crest_learner``)."""
    return ReMixMatchCReSTPlus if cfg.base == "remixmatch" else CReSTPlus


@register("crest", learner=crest_learner)
class CReST(Generations, FixMatch):
    """FixMatch whose labeled set grows, class-rebalanced, between generations (the class of
    ``algorithm=crest``; with ``base=remixmatch`` the registry builds ``ReMixMatchCReST``)."""

    Config = CReSTConfig

    def __init__(self, cfg: CReSTConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        check_crest_config(cfg)
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        self._init_generations(labeled_labels)

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int):
        """The heads of the learner ``cfg.base`` (ReMixMatch's rotation head)."""
        if cfg.base == "remixmatch":
            return ReMixMatchCReST.make_heads(cfg, feat_dim, num_classes)
        return super().make_heads(cfg, feat_dim, num_classes)


@register("crest_plus", learner=crest_plus_learner)
class CReSTPlus(CReST):
    """CReST with progressive distribution alignment (CReST+, the DASO paper's comparator)."""

    Config = CReSTPlusConfig
