"""The algorithm contract: one training step's losses from a batch and the trainer's state.

An algorithm computes ``loss, logs = algo.step(batch, state)``. The trainer alone owns the
optimizer, precision, EMA, schedule, logging and checkpoints, and never looks at which
algorithm it runs. An algorithm is an ``nn.Module`` so that its own state (running means,
memory banks, DASO queues) lives in buffers that move with ``.to(device)`` and are saved by
``state_dict()``; the network is *not* a submodule of the algorithm, it arrives in ``state``.

Logs: a dict of tensors, never Python floats (no host sync per step).
  * 0-d tensors are scalars averaged over the log interval (``loss/...``, ``mask/...``).
  * keys under ``pseudo/`` are 1-d tensors with one entry per unlabeled image of the batch,
    in the order of ``batch.x_ulb[0]``: ``pseudo/linear`` (argmax of the classifier's
    prediction on the weak view), ``pseudo/semantic`` and ``pseudo/final`` where present,
    and ``pseudo/mask`` (1.0 where the pseudo-label is used by the unlabeled loss).
    The trainer pairs them with the true labels (which algorithms never see) for diagnostics.

Hooks beyond ``step`` (no-op defaults; the trainer calls them without knowing the method):
  * ``phase(step, total)``: the step within the current phase and the phase's length, which
    the learning-rate schedule and the EMA warm-up see (self-training generations restart them).
  * ``labeled_update_due(step, total)`` / ``update_labeled_set(probs, ...)``: after such a step
    the trainer hands over the EMA model's predictions (``label_predictor``) on the whole
    unlabeled set and gets
    back a ``LabeledSetUpdate`` (unlabeled images added to the labeled set with pseudo-labels,
    optionally restarting network, EMA and optimizer); it is checkpointed and logged per class.
  * ``labeled_views``: extra augmentations of the labeled batch (``batch.x_lb_views``),
    drawn after the unlabeled views; none by default (CCL's contrastive views).
  * ``labeled_sampling``: how the labeled batch stream samples ("shuffle" epochs,
    "class_balanced": class uniformly, then an image of it, or an object whose
    ``make(dataset, batch_size, seed, device)`` builds the stream, e.g. cRT's class-aware one).
  * ``eval_network(model, ema_model)``: the network evaluation measures (EMA by default).
  * ``observe_evaluation(soft_predictions)``: after each evaluation, that network's softmax
    on a split, on demand (DARP's estimation run).
  * ``init_from`` / ``configure_network(model)``: a checkpoint whose weights the run starts
    from, and which parameters train (a post-training phase such as classifier re-training).
  * ``eval_predictor(model)`` / ``label_predictor(model)``: the two named prediction roles,
    what evaluation argmaxes and what labels data (the latter never post-hoc adjusted).

Logit adjustment (LA; Menon et al., ICLR 2021), for every algorithm through two fields of
``AlgorithmConfig``: ``logit_adjust=loss`` trains the labeled loss on ``f(x) + tau log pi``
(``labeled_logits``; official DASO ``ALGORITHM.LOGIT_ADJUST``: ``l_logits += tau *
p_data.log()`` in lib/algorithm/fixmatch.py, supervised.py, lib/models/daso_model.py) and
``logit_adjust=posthoc`` evaluates ``argmax f(x) - tau log pi`` (``eval_logits``; official
``eval_loop``: ``outputs - p_data.log()``), pi being the labeled class frequencies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class AlgorithmConfig:
    """Fields every algorithm has; each algorithm extends it with its paper's defaults."""

    name: str = "supervised"
    uratio: int = 2  # mu: unlabeled images per labeled image (DASO's protocol: 2)
    logit_adjust: str = "none"  # none | loss | posthoc (Menon et al. ICLR 2021; see above)
    la_tau: float = 1.0  # tau of LA (Menon et al. Eq. 10; official LOGIT_ADJUST.TAU 1.0)


#: ``logit_adjust`` values: off, the logit-adjusted labeled loss, post-hoc adjustment at evaluation
LOGIT_ADJUST_MODES = ("none", "loss", "posthoc")


def logit_adjustment(prior: Tensor, tau: float) -> Tensor:
    """tau * log pi (Menon et al. Eqs. 9-10): the offset LA adds to the logits in the loss and
    subtracts from them post hoc."""
    return tau * prior.log()


@dataclass
class Batch:
    """Augmented, normalised images on the training device.

    ``x_ulb[i]`` is the unlabeled batch under the i-th view of ``algo.unlabeled_views``
    (the same images in the same order in every view). ``x_lb`` is the labeled batch's weak
    view; ``x_lb_views[i]`` the same images under the i-th view of ``algo.labeled_views``.
    """

    x_lb: Tensor
    y_lb: Tensor
    idx_lb: Tensor
    x_ulb: list[Tensor] = field(default_factory=list)
    idx_ulb: Tensor | None = None
    x_lb_views: list[Tensor] = field(default_factory=list)


@dataclass
class StepState:
    """What the trainer lends an algorithm for one step."""

    step: int
    total_steps: int
    model: nn.Module
    ema_model: nn.Module


@dataclass
class TrainingData:
    """What the trainer lends a method that draws its own batches or features beside the
    step's (``attach_data``): the initial labeled and the unlabeled set (``TensorSet``, on the
    training device), the augmenter, the run's seed, the global labeled batch size and the
    evaluation batch size."""

    labeled: object
    unlabeled: object
    augmenter: object
    seed: int
    batch_size: int
    eval_batch_size: int


@dataclass
class LabeledSetUpdate:
    """The labeled set from now on: the initial labeled images plus the unlabeled images
    ``indices`` labeled ``labels`` (replacing earlier additions); ``restart`` re-initialises
    network, EMA and optimizer (a new self-training generation)."""

    indices: Tensor
    labels: Tensor
    restart: bool = False


class Algorithm(nn.Module):
    """Base class: subclasses set ``Config``, the views they need, and implement ``step``."""

    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    #: augmentations of the unlabeled batch the step needs, e.g. ("weak", "strong")
    unlabeled_views: ClassVar[tuple[str, ...]] = ()
    #: augmentations of the labeled batch beyond its weak view ``x_lb``, e.g. ("strong",);
    #: drawn after the unlabeled views, so an algorithm without them sees the same stream
    labeled_views: ClassVar[tuple[str, ...]] = ()
    #: labeled batch sampling: "shuffle" (epochs) | "class_balanced" (class, then image)
    labeled_sampling: ClassVar[str] = "shuffle"
    #: whether the method reads the validation set (the trainer refuses a run without one)
    needs_validation: ClassVar[bool] = False

    def __init__(self, cfg: AlgorithmConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner: nn.Module | None = None):
        super().__init__()
        from imbssl.pseudo import IdentityRefiner

        self.cfg = cfg
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.num_labeled = len(labeled_labels)
        counts = torch.bincount(labeled_labels.long().cpu(), minlength=num_classes).float()
        #: p(y) of the labeled set (the target of distribution alignment)
        self.register_buffer("labeled_prior", counts / counts.sum().clamp_min(1.0),
                             persistent=False)
        self.register_buffer("la_offset", self._la_offset(cfg), persistent=False)
        self.refiner = refiner if refiner is not None else IdentityRefiner()
        if not self.unlabeled_views and type(self.refiner) is not IdentityRefiner:
            from imbssl.errors import UserError

            raise UserError(f"algorithm={cfg.name} trains on labeled data only, so a "
                            "pseudo-label refiner does not apply; add pseudo=none")

    def _la_offset(self, cfg: AlgorithmConfig) -> Tensor:
        """tau * log pi of the labeled set, or zeros with ``logit_adjust=none``."""
        from imbssl.errors import UserError

        mode = getattr(cfg, "logit_adjust", "none")
        if mode not in LOGIT_ADJUST_MODES:
            raise UserError(f"algorithm.logit_adjust={mode!r} is invalid: choose one of "
                            f"{', '.join(LOGIT_ADJUST_MODES)}")
        if mode == "none":
            return torch.zeros_like(self.labeled_prior)
        if cfg.la_tau < 0:
            raise UserError(f"algorithm.la_tau={cfg.la_tau} is invalid: it must be >= 0")
        if bool((self.labeled_prior == 0).any()):
            raise UserError("algorithm.logit_adjust needs every class in the labeled set "
                            "(log pi of an empty class is -inf); raise dataset.n1")
        return logit_adjustment(self.labeled_prior, cfg.la_tau)

    def labeled_logits(self, logits: Tensor) -> Tensor:
        """The logits the labeled loss is computed on: ``f(x) + tau log pi`` with
        ``logit_adjust=loss`` (LA's loss, Menon et al. Eq. 10), ``f(x)`` otherwise."""
        if getattr(self.cfg, "logit_adjust", "none") != "loss":
            return logits
        return logits.float() + self.la_offset

    def labeled_loss(self, logits_x: Tensor, y_lb: Tensor) -> Tensor:
        """``1/B sum_b H(y_b, f(x_b))`` in float32 on ``labeled_logits`` (+LA with
        ``logit_adjust=loss``)."""
        return F.cross_entropy(self.labeled_logits(logits_x).float(), y_lb)

    def posthoc_adjust(self, logits: Tensor) -> Tensor:
        """``f(x) - tau log pi`` with ``logit_adjust=posthoc`` (Menon et al. Eq. 9),
        ``f(x)`` otherwise: for ``eval_logits`` (and overrides of it)."""
        if getattr(self.cfg, "logit_adjust", "none") != "posthoc":
            return logits
        return logits.float() - self.la_offset

    @classmethod
    def make_heads(cls, cfg: AlgorithmConfig, feat_dim: int,
                   num_classes: int) -> dict[str, nn.Module]:
        """Extra heads the network needs (a rotation classifier, a projection head)."""
        return {}

    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    @property
    def init_from(self) -> str:
        """A checkpoint (file or run folder) whose weights the run starts from ("": none)."""
        return ""

    def configure_network(self, model: nn.Module) -> None:
        """Freeze what the method keeps fixed (after ``init_from`` is loaded); all trains by default."""

    def load_init_weights(self, model: nn.Module, ema_model: nn.Module, state: dict) -> None:
        """Load ``init_from``'s checkpoint ``state`` into the network and its EMA copy."""
        model.load_state_dict(state["model"])
        ema_model.load_state_dict(state["ema"])

    def observe_unlabeled_size(self, num_unlabeled: int) -> None:
        """Construction: the number of unlabeled images (SimPro weighs its labeled loss by
        the labeled-to-unlabeled batch counts of an epoch). No-op by default."""

    def phase(self, step: int, total: int) -> tuple[int, int]:
        """(step within the current phase, the phase's length) for the schedule and EMA warm-up."""
        return step, total

    def labeled_update_due(self, step: int, total: int) -> bool:
        """Whether the labeled set changes after ``step`` finished steps."""
        return False

    def update_labeled_set(self, unlabeled_probs: Tensor, step: int,
                           total: int) -> LabeledSetUpdate:
        """The new labeled set from the EMA model's (N_u, K) probabilities on the unlabeled set."""
        raise NotImplementedError(f"{type(self).__name__} does not change the labeled set")

    def attach_data(self, data: TrainingData) -> None:
        """The training data, handed over once after construction (before a resume loads the
        algorithm's state); a method that samples its own batches keeps it (CoSSL's
        class-balanced classifier stream). No-op by default."""

    def phase_switch_due(self, step: int, total: int) -> bool:
        """Whether the method's next phase starts after ``step`` finished steps (called after
        the step's evaluation, before its checkpoint)."""
        return False

    def switch_phase(self, model: nn.Module, ema_model: nn.Module) -> dict:
        """Start the next phase (CoSSL: the classifier warm-up between pre-training and
        co-learning); returns numbers logged to metrics.jsonl (split ``phase``)."""
        raise NotImplementedError(f"{type(self).__name__} has one phase")

    def eval_logits(self, output) -> Tensor:
        """The logits evaluation takes the argmax of, from the network's output: the
        classifier's by default (post-hoc logit-adjusted with ``logit_adjust=posthoc``); a
        method may read another head or adjust them post hoc."""
        return self.posthoc_adjust(output.logits)

    def eval_network(self, model: nn.Module, ema_model: nn.Module) -> nn.Module:
        """The network evaluation measures: the EMA network by default; a method may name
        the online one (official cRT evaluates ``self.model``)."""
        return ema_model

    def eval_predictor(self, model: nn.Module):
        """The prediction we *evaluate*: ``output -> logits`` that evaluation (test and
        validation accuracy, ``imbssl eval``) argmaxes for ``model``, the network evaluated
        (its heads included): ``eval_logits`` by default (post-hoc logit-adjusted with
        ``logit_adjust=posthoc``); a method that predicts with one of ``model.heads`` (ABC's
        balanced classifier) returns a function reading that head. Never used to label data
        (see ``label_predictor``)."""
        return self.eval_logits

    def label_predictor(self, model: nn.Module):
        """The prediction that *labels data*: ``output -> logits`` whose softmax the trainer
        hands to ``update_labeled_set`` (the EMA network's predictions on the unlabeled set,
        CReST's selection). By default the classifier's raw logits, without post-hoc logit
        adjustment: the official CReST code (DASO ``lib/algorithm/fm_crest.py``) selects on
        the raw EMA softmax, LA (inf) being only an evaluation metric there."""
        return raw_logits

    def feed_refiner(self, batch: Batch, state: StepState,
                     ema_features: Tensor | None = None) -> None:
        """Give the refiner the EMA model's features of the labeled batch (DASO's queues);
        pass ``ema_features`` when the algorithm has computed them already. First tells the
        refiner the step's batch and state (``begin_step``: DARP's unlabeled indices)."""
        self.refiner.begin_step(batch, state)
        if self.refiner.needs_labeled_features:
            if ema_features is None:
                with torch.no_grad():
                    ema_features = state.ema_model(batch.x_lb).features
            self.refiner.update_labeled(ema_features.float(), batch.y_lb)

    def observe_validation(self, confusion: Tensor) -> None:
        """The trainer's (true, predicted) counts on the validation set after each
        evaluation; passed to the refiner (DARP's estimate of the unlabeled distribution)."""
        self.refiner.observe_validation(confusion)

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        """kind -> (metric -> (K,) tensor): the per-class state its pseudo-label components
        publish (``PerClassDiagnostics``: the refiner first, then distribution alignment),
        logged to per_class.csv after each evaluation."""
        from imbssl.pseudo.base import PerClassDiagnostics

        parts: dict[str, dict[str, Tensor]] = {}
        for module in self.children():
            if isinstance(module, PerClassDiagnostics):
                state = module.per_class_diagnostics()
                if state:
                    parts[module.diagnostics_kind] = state
        return parts

    def observe_evaluation(self, soft_predictions) -> None:
        """After each evaluation: ``soft_predictions(split)`` gives ``(probs, labels)`` of the
        evaluated network (``eval_network``, softmax of ``eval_predictor``) on the split
        "test", "valid" or "unlabeled" (None when the run has no such split); computed only
        when called. No-op by default (DARP's estimation run reads it)."""

    def probe_ctaugment(self, batch: Batch, state: StepState) -> dict[str, Tensor]:
        """With CTAugment (``self.ctaugment``): score labeled probes with the EMA model (one
        no-grad forward of the labeled batch, official FixMatch/ReMixMatch ``classify_op``)
        and update the bin weights; returns its log."""
        cta = getattr(self, "ctaugment", None)
        if cta is None:
            return {}
        return {"ctaugment/proximity": cta.probe_step(state.ema_model, batch.x_lb, batch.y_lb)}


def refuse_logit_adjust(cfg, name: str, why: str) -> None:
    """One line, exit 2, when ``algorithm.logit_adjust`` is set for a method that adjusts (or
    balances) its logits itself: ``why`` says how, e.g. "adjusts its logits itself"."""
    if getattr(cfg, "logit_adjust", "none") != "none":
        from imbssl.errors import UserError

        raise UserError(f"algorithm={name} {why}; algorithm.logit_adjust={cfg.logit_adjust} "
                        "does not apply, set algorithm.logit_adjust=none")


def fill_null_fields(cfg, values: dict) -> None:
    """Set each field of ``cfg`` that is None (a ``null`` in the config: "the method's own
    value") to ``values[field]``, e.g. the official value of the chosen base learner."""
    for key, value in values.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)


def reject_setting(cfg, field: str, rule: str, when: bool) -> None:
    """Raise ``ValueError("algorithm.<field> must be <rule>, got <value>")`` when ``when``
    (the constructors' check of their settings)."""
    if when:
        raise ValueError(f"algorithm.{field} must be {rule}, got {getattr(cfg, field)}")


def raw_logits(output) -> Tensor:
    """The classifier's logits as the network outputs them (no adjustment)."""
    return output.logits


def forward_all(model: nn.Module, *xs: Tensor):
    """One forward pass over the concatenation of ``xs`` (batch-norm sees them together);
    returns a (logits, features) pair per input, in order."""
    out = model(torch.cat(xs))
    sizes = [len(x) for x in xs]
    return list(zip(out.logits.split(sizes), out.features.split(sizes), strict=True))
