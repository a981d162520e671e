"""DASO: Distribution-Aware Semantics-Oriented pseudo-labels (Oh et al., CVPR 2022).

DASO refines the pseudo-label an SSL algorithm derives from its linear classifier:

* **Balanced prototypes.** One FIFO queue per class, all of the same size ``queue_size``, fed
  every step with the EMA model's features of the labeled batch. A class prototype is the
  mean of its queue.
* **Semantic pseudo-label.** ``q = softmax(cos(z, prototypes) / T_proto)`` for the online
  model's features ``z`` of the weak view of the *current* unlabeled batch.
* **Distribution-aware blending.** ``p' = (1 - v[k]) * p + v[k] * q`` with ``k = argmax p`` (the
  linear prediction) and ``v = m_hat ** (1 / T_dist) / max(m_hat ** (1 / T_dist))``, where
  ``m_hat`` is the class histogram of the final pseudo-labels (all of them, no confidence
  filter), recomputed every ``dist_window`` steps. Classes the model over-predicts get the
  largest share of the (less biased) semantic pseudo-label. ``blend_mode="fixed"`` is the
  paper's fixed-weight ablation (``p' = (1 - a) p + a q`` for every row, official
  ``WITH_DIST_AWARE = False`` with ``INTERP_ALPHA = 0.5``); ``blend_mode="off"`` keeps ``p``.
* **Semantic alignment loss.** Cross-entropy between the weak view's semantic probabilities
  (target, no gradient) and the strong view's, averaged over all unlabeled images.

The confidence threshold of the host algorithm (FixMatch's 0.95) is applied by the algorithm
to the *blended* probabilities ``p'``: the final pseudo-label and its confidence are
``max(p')``, not the linear ones.

Facts taken from the official implementation (github.com/ytaek-oh/daso):

* Features are *not* L2-normalised before they are queued (``lib/models/daso_model.py``
  enqueues the raw EMA-encoder features; ``lib/models/feature_queue.py`` stores them as they
  come and takes the plain mean). Normalisation happens only inside the cosine similarity.
* Prototypes start at zero (``feature_queue.py``: ``self.prototypes = torch.zeros(...)``) and
  a class's prototype is only set once the class has been queued; the cosine with a zero
  prototype is 0 (``nn.CosineSimilarity`` clamps the norm product). This module does the
  same: a class with an empty queue has a zero prototype, hence semantic logit 0.
* The queue of the current labeled batch is updated *before* the prototypes are used in the
  same step (``daso_model.py: forward_train``); the engine calls ``update_labeled`` before
  ``refine`` for the same reason.
* ``m_hat``: every final pseudo-label is pushed (``dist_logger.push_pl_list``) and every
  ``PL_DIST_UPDATE_PERIOD = 100`` iterations (``lib/config/defaults.py``; the update in
  ``lib/algorithm/daso.py`` runs when ``(iter + 1) % period == 0``) the histogram of the
  pushed labels replaces the distribution and the list is cleared
  (``lib/utils/dist_logger.py: update_pl_dist``). Blending in a step uses the distribution
  from *before* that step's labels are pushed. The official distribution starts as all-zero
  (``get_pl_dist`` would divide 0 by 0), which never matters there because warm-up (5000)
  outlasts the first update (100); here ``m_hat`` starts uniform.
* Warm-up: ``lib/algorithm/daso.py`` sets ``pretraining = False`` *after* iteration ``iter``
  when ``iter + 1 >= PRETRAIN_STEPS`` (iterations counted from 0), so iteration ``i`` blends
  iff ``i >= PRETRAIN_STEPS``. ``active(step)`` is ``step >= warmup_iters`` with the
  trainer's 0-based step, which is the same for ``warmup_iters >= 1`` (the official flag
  starts ``True``, so with ``PRETRAIN_STEPS = 0`` it would still skip iteration 0; here
  ``warmup_iters = 0`` means active from step 0).
* The alignment loss is ``-sum(q_w * log_softmax(sim_strong / T_proto)) / B`` weighted by
  ``PSA_LOSS_WEIGHT = 1.0``; ``q_w`` is computed without gradient.
* Similarities and the blend are computed in float32 (or the buffers' wider dtype) with
  autocast off: under bf16 autocast the cosine matmul would round ``cos / T_proto`` (up to
  20 in magnitude) to 8 mantissa bits and flip confidence-mask decisions.

Unlike the official code, all state lives in buffers, so a checkpoint resumes exactly
(queues, write pointers, ``m_hat``, the half-filled window and the step counter).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from imbssl.collectives import all_gather_cat
from imbssl.errors import UserError
from imbssl.pseudo.base import IdentityRefiner

#: ``blend_mode`` values: distribution-aware weights (the paper), one fixed weight for every
#: row (the paper's ablation, official ``WITH_DIST_AWARE = False``), or no blending
BLEND_MODES = ("distribution", "fixed", "off")


@dataclass
class DASOConfig:
    """Hydra schema of ``pseudo=daso`` (registered as ``pseudo/daso_schema``)."""

    name: str = "daso"
    queue_size: int = 256          # per-class queue length (balanced prototypes)
    proto_temperature: float = 0.05  # T_proto of the semantic pseudo-label
    dist_temperature: float = 1.5  # T_dist: 1.5 for CIFAR-10 with gamma_l = gamma_u, else 0.3
    warmup_iters: int = 5000       # no blending / alignment loss before this step
    dist_window: int = 100         # m_hat recomputed every this many observe() calls
    align_weight: float = 1.0      # weight of the semantic alignment loss
    blend_mode: str = "distribution"  # distribution | fixed | off (see BLEND_MODES)
    fixed_weight: float = 0.5      # the blend weight of blend_mode=fixed (official INTERP_ALPHA)


class DASOEngineHooks(IdentityRefiner):
    """The refiner hooks that imbssl's algorithms call (``imbssl/pseudo/base.py``).

    Engine-only: code outside imbssl does not call these; it uses the ``DASO`` methods
    listed in ``DASO``'s docstring. Each hook is a composition of those methods, without
    the input checks that read tensor values (the engine's inputs come from its own
    networks, and its hot path has no host sync).
    """

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, feat_dim: int) -> DASO:
        """Engine hook: imbssl builds DASO from the ``pseudo`` config (a ``DASOConfig``, or
        any object / DictConfig with its fields) with ``check_inputs=False``. Not for user
        code: call ``DASO(num_classes, feat_dim, ...)``."""
        values = {f.name: getattr(cfg, f.name, f.default) for f in fields(DASOConfig)}
        if values.pop("name") != "daso":
            raise ValueError(f"DASO.from_config got a config named {cfg.name!r}")
        return cls(num_classes, feat_dim, **values, check_inputs=False)

    @property
    def needs_labeled_features(self) -> bool:
        """Engine hook: True, the engine passes the EMA model's labeled features to
        ``update_labeled`` every step."""
        return True

    def begin_step(self, batch, state) -> None:
        """Engine hook: the start of an engine step (DASO needs nothing from it)."""

    def observe_validation(self, confusion: Tensor) -> None:
        """Engine hook: a validation confusion matrix (DASO does not use it)."""

    def update_labeled(self, features: Tensor, labels: Tensor) -> None:
        """Engine hook: the EMA model's labeled features -> ``enqueue`` (all ranks)."""
        self._check_features(features, "update_labeled", "features")
        _check_labels(labels, "update_labeled", "labels", len(features))
        self._enqueue(features, labels, check_values=False)

    @torch.no_grad()
    def refine(self, probs: Tensor, features_weak: Tensor, step: int) -> Tensor:
        """Engine hook: ``blend(probs, semantic_probs(features_weak))`` once ``active(step)``,
        ``probs`` unchanged before. The semantic label is always computed for the logs
        (-1 while every queue is empty)."""
        self._check_features(features_weak, "refine", "features_weak")
        q = self._similarity_logits(features_weak.detach()).softmax(dim=-1)
        any_queued = (self.queue_len > 0).any()
        self.last_linear = probs.argmax(dim=-1)
        self.last_semantic = torch.where(any_queued, q.argmax(dim=-1),
                                         torch.full_like(self.last_linear, -1))
        refined = self._blend(probs, q) if self.active(step) else probs
        self.last_final = refined.argmax(dim=-1)
        return refined

    def extra_loss(self, features_weak: Tensor, features_strong: Tensor,
                   step: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Engine hook: the (weighted) ``alignment_loss`` once ``active(step)``;
        ``(None, {})`` during warm-up or when ``align_weight == 0``."""
        if not self.active(step) or self.align_weight == 0.0:
            return None, {}
        self._check_pair(features_weak, features_strong)
        loss = self._alignment_loss(features_weak, features_strong)
        return loss, {"loss/daso_align": loss.detach()}

    def pseudo_logs(self) -> dict[str, Tensor]:
        """Engine hook: ``pseudo/semantic`` of the last ``refine`` (the algorithm logs
        linear/final/mask)."""
        if self.last_semantic is None:
            return {}
        return {"pseudo/semantic": self.last_semantic}


class DASO(DASOEngineHooks):
    """DASO pseudo-label refiner; see the module docstring and README.md, "DASO in your own
    training loop".

    ``DASO(num_classes, feat_dim, queue_size=256, proto_temperature=0.05,
    dist_temperature=1.5, warmup_iters=5000, dist_window=100, *, align_weight=1.0,
    blend_mode="distribution", fixed_weight=0.5, check_inputs=True)``; the defaults are the
    paper's CIFAR-10 settings:

    * ``num_classes``: K, the number of classes (labels are 0 .. K-1).
    * ``feat_dim``: the width of the features, the input of your classifier layer
      (``model.fc.in_features``).
    * ``queue_size``: features kept per class; each class prototype is the mean of its queue.
    * ``proto_temperature``: T_proto of the semantic pseudo-label
      ``softmax(cos(z, prototypes) / T_proto)`` and of the alignment loss (finite, > 0).
    * ``dist_temperature``: T_dist of the blend weights ``v = m_hat ** (1 / T_dist)`` (scaled
      to max 1); 1.5 for CIFAR-10 with gamma_l = gamma_u, 0.3 otherwise (finite, > 0).
    * ``warmup_iters``: steps (``observe`` calls) before ``active()`` turns True: no blend
      and no alignment loss before.
    * ``dist_window``: ``m_hat``, the class distribution of your final pseudo-labels, is
      recomputed every this many ``observe`` calls.
    * ``align_weight``: the weight ``alignment_loss`` already applies (finite, >= 0).
    * ``blend_mode``: ``"distribution"`` (the paper), ``"fixed"`` (one weight
      ``fixed_weight`` for every row, the paper's ablation) or ``"off"`` (``blend`` returns
      ``p``).
    * ``fixed_weight``: the blend weight of ``blend_mode="fixed"``, in [0, 1].
    * ``check_inputs``: True (the default) checks what the user API receives: finite
      features, labels in [0, K), probabilities where probabilities belong, a batch that
      ``observe`` sees whole, queues filled before ``semantic_probs``. Each check reads tensor
      values (one host sync); False skips them, as imbssl's engine does.

    For your own training loop (each step, in this order):

    * ``enqueue(features, labels)``: the EMA model's features (N, feat_dim) of the labeled
      batch into the class queues.
    * ``semantic_probs(features_weak)`` -> ``q``; ``blend(p, q)`` -> the pseudo-label
      probabilities ``p'`` to threshold, once ``active()``. ``p`` is
      ``logits.softmax(dim=-1)``, not the logits.
    * ``observe(pseudo_labels)``: every final hard pseudo-label of the batch (integer (B,),
      ``p'.argmax(dim=-1)``), the confident ones and the others: ``m_hat`` is the
      distribution of all of them. ``labels[mask]`` is refused when ``blend`` saw B rows.
    * ``alignment_loss(features_weak, features_strong)``: the loss, already multiplied by
      ``align_weight``, once ``active()``.
    * ``active()``: False during the first ``warmup_iters`` steps (counted by ``observe``).

    Every misuse above is an error before any state changes. Save ``daso.state_dict()`` in
    your checkpoint and load it on resume: without it the queues, ``m_hat`` and the step
    count restart and so does the warm-up (``load_state_dict`` warns about a state without
    DASO's entries, and refuses it unless ``strict=False``).

    Under ``torch.distributed`` ``enqueue`` and ``observe`` are collectives: every rank
    calls them every step with tensors of the same shape, and every rank ends up with the
    same queues and ``m_hat`` (those of the global batch, in rank order).

    ``from_config``, ``needs_labeled_features``, ``begin_step``, ``update_labeled``,
    ``refine``, ``observe_validation``, ``extra_loss`` and ``pseudo_logs`` (inherited from
    ``DASOEngineHooks``) are imbssl's engine hooks, not for user code.
    """

    diagnostics_kind = "daso"

    def __init__(self, num_classes: int, feat_dim: int, queue_size: int = 256,
                 proto_temperature: float = 0.05, dist_temperature: float = 1.5,
                 warmup_iters: int = 5000, dist_window: int = 100, *,
                 align_weight: float = 1.0, blend_mode: str = "distribution",
                 fixed_weight: float = 0.5, check_inputs: bool = True):
        super().__init__()
        _check(num_classes >= 1, "num_classes", num_classes, ">= 1")
        _check(feat_dim >= 1, "feat_dim", feat_dim, ">= 1")
        _check(queue_size >= 1, "queue_size", queue_size, ">= 1")
        _check(_finite(proto_temperature) and proto_temperature > 0, "proto_temperature",
               proto_temperature, "a finite number > 0")
        _check(_finite(dist_temperature) and dist_temperature > 0, "dist_temperature",
               dist_temperature, "a finite number > 0")
        _check(warmup_iters >= 0, "warmup_iters", warmup_iters, ">= 0")
        _check(dist_window >= 1, "dist_window", dist_window, ">= 1")
        _check(_finite(align_weight) and align_weight >= 0, "align_weight", align_weight,
               "a finite number >= 0")
        _check(blend_mode in BLEND_MODES, "blend_mode", blend_mode, f"one of {BLEND_MODES}")
        _check(_finite(fixed_weight) and 0 <= fixed_weight <= 1, "fixed_weight",
               fixed_weight, "in [0, 1]")

        self.num_classes = int(num_classes)
        self.feat_dim = int(feat_dim)
        self.queue_size = int(queue_size)
        self.proto_temperature = float(proto_temperature)
        self.dist_temperature = float(dist_temperature)
        self.warmup_iters = int(warmup_iters)
        self.dist_window = int(dist_window)
        self.align_weight = float(align_weight)
        self.blend_mode = str(blend_mode)
        self.fixed_weight = float(fixed_weight)
        self.check_inputs = bool(check_inputs)

        k, q = self.num_classes, self.queue_size
        # circular per-class queues; unfilled slots stay zero
        self.register_buffer("queue", torch.zeros(k, q, self.feat_dim))
        self.register_buffer("queue_len", torch.zeros(k, dtype=torch.long))  # filled slots
        self.register_buffer("queue_ptr", torch.zeros(k, dtype=torch.long))  # next write slot
        # m_hat: distribution of final pseudo-labels over the last complete window
        self.register_buffer("m_hat", torch.full((k,), 1.0 / k))
        self.register_buffer("window_counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.long))

        # this step's labels, for pseudo_logs() (transient, not state)
        self.last_linear: Tensor | None = None
        self.last_semantic: Tensor | None = None
        self.last_final: Tensor | None = None
        # rows of the last user ``blend`` since the last ``observe`` (check_inputs only)
        self._rows_blended: int | None = None

    def extra_repr(self) -> str:
        """The constructor arguments (printed by ``repr``)."""
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"queue_size={self.queue_size}, proto_temperature={self.proto_temperature}, "
                f"dist_temperature={self.dist_temperature}, warmup_iters={self.warmup_iters}, "
                f"dist_window={self.dist_window}, align_weight={self.align_weight}, "
                f"blend_mode={self.blend_mode!r}, fixed_weight={self.fixed_weight}")

    # ------------------------------------------------------------------ queues / prototypes
    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        """Push labeled features (N, feat_dim) with integer labels (N,) into their class
        queues, oldest entries dropped. Under ``torch.distributed`` every rank's batch is
        queued on every rank, in rank order (a collective: every rank must call it).

        Vectorised: each sample's rank among the batch samples of its class gives its slot
        ``(ptr[c] + rank) % queue_size``; when a class has more than ``queue_size`` samples
        in the batch only its last ``queue_size`` are kept (the others add an exact zero to
        an already cleared slot, so duplicate indices are harmless). No host sync when
        ``check_inputs`` is False; with it, non-finite rows and labels outside [0, K) are
        refused before any queue changes.
        """
        self._check_features(features, "enqueue", "features")
        _check_labels(labels, "enqueue", "labels", len(features))
        self._enqueue(features, labels, check_values=self.check_inputs)

    def _enqueue(self, features: Tensor, labels: Tensor, check_values: bool) -> None:
        feats = all_gather_cat(features.detach()).to(self.queue.device, self.queue.dtype)
        labels = all_gather_cat(labels.detach()).to(self.queue.device).long()
        if check_values:  # on the gathered batch: every rank raises together
            _check_finite_rows(feats, "enqueue", "features")
            self._check_label_range(labels, "enqueue", "labels")
        k, q = self.num_classes, self.queue_size
        onehot = (labels[:, None] == torch.arange(k, device=labels.device)[None, :]).long()
        seen = onehot.cumsum(0)                              # (N, K) running count per class
        n_new = onehot.sum(0)                                # (K,)  samples per class
        rank = seen.gather(1, labels[:, None]).squeeze(1) - 1  # order within its class
        keep = rank >= (n_new[labels] - q)                   # the last q of each class
        slot = (self.queue_ptr[labels] + rank) % q
        flat = self.queue.view(k * q, self.feat_dim)
        index = labels * q + slot
        flat.index_put_((index,), torch.zeros_like(feats))
        flat.index_put_((index,), torch.where(keep[:, None], feats, torch.zeros_like(feats)),
                        accumulate=True)
        self.queue_ptr.copy_((self.queue_ptr + n_new) % q)
        self.queue_len.copy_((self.queue_len + n_new).clamp_max(q))

    @property
    def prototypes(self) -> Tensor:
        """(K, D) mean of each class queue over its filled slots; zero for an empty queue."""
        denom = self.queue_len.clamp_min(1).to(self.queue.dtype)[:, None]
        return self.queue.sum(1) / denom

    def class_queue(self, c: int) -> Tensor:
        """The queued features of class ``c``, oldest first (inspection; syncs)."""
        n = int(self.queue_len[c])
        start = (int(self.queue_ptr[c]) - n) % self.queue_size
        order = (start + torch.arange(n, device=self.queue.device)) % self.queue_size
        return self.queue[c, order]

    # ------------------------------------------------------------------ semantic pseudo-label
    def semantic_logits(self, features: Tensor) -> Tensor:
        """cos(features, prototypes) / T_proto, (B, K), in float32 (autocast off);
        gradient flows into ``features``. With ``check_inputs``: refused while every queue is
        empty (each prototype is zero, ``q`` would be uniform) or for non-finite rows."""
        self._check_semantic_input(features, "semantic_logits")
        return self._similarity_logits(features)

    def _check_semantic_input(self, features: Tensor, method: str) -> None:
        self._check_features(features, method, "features")
        if self.check_inputs:
            self._check_queued(method)
            _check_finite_rows(features, method, "features")

    def _similarity_logits(self, features: Tensor) -> Tensor:
        dtype = torch.promote_types(self.queue.dtype, torch.float32)
        with torch.autocast(features.device.type, enabled=False):
            protos = F.normalize(self.prototypes.to(dtype), dim=-1)
            z = F.normalize(features.to(dtype), dim=-1)
            return z @ protos.t() / self.proto_temperature

    def semantic_probs(self, features: Tensor) -> Tensor:
        """Semantic pseudo-label ``softmax(cos(features, prototypes) / T_proto)``, (B, K),
        float32, for the features (B, feat_dim) of the current unlabeled batch. Call
        ``enqueue`` first: with ``check_inputs`` it refuses while every queue is empty."""
        self._check_semantic_input(features, "semantic_probs")
        return self._similarity_logits(features).softmax(dim=-1)

    # ------------------------------------------------------------------ blending
    def blend_weights(self) -> Tensor:
        """v (K,), the blend weight of each linear-argmax class: ``m_hat ** (1/T_dist)``
        normalised by its max (``distribution``), ``fixed_weight`` (``fixed``) or 0 (``off``)."""
        if self.blend_mode == "off":
            return torch.zeros_like(self.m_hat)
        if self.blend_mode == "fixed":
            return torch.full_like(self.m_hat, self.fixed_weight)
        v = self.m_hat.pow(1.0 / self.dist_temperature)
        return v / v.max().clamp_min(torch.finfo(v.dtype).tiny)

    def per_class_diagnostics(self) -> dict[str, Tensor]:
        """``m_hat`` (distribution of the final pseudo-labels) and the blend weights ``v``
        (DASO Eqs. 5-6) per class."""
        return {"m_hat": self.m_hat, "blend_weight": self.blend_weights()}

    def blend(self, linear_probs: Tensor, semantic_probs: Tensor) -> Tensor:
        """``p' = (1 - v[k]) * p + v[k] * q`` with ``k = argmax p`` per row, in float32
        (autocast off); ``p`` itself when ``blend_mode="off"``. Threshold ``p'``.
        ``linear_probs`` are probabilities (``logits.softmax(dim=-1)``): with
        ``check_inputs``, rows that are negative or do not sum to 1 are refused."""
        p, q = linear_probs, semantic_probs
        if not isinstance(p, Tensor) or not isinstance(q, Tensor) or p.ndim != 2 \
                or p.shape[1] != self.num_classes or q.shape != p.shape:
            raise ValueError(f"DASO.blend expects two (B, num_classes={self.num_classes}) "
                             f"probability tensors, got {_describe(p)} and {_describe(q)}")
        if self.check_inputs:
            _check_probabilities(p, "linear_probs", "logits.softmax(dim=-1)")
            _check_probabilities(q, "semantic_probs", "daso.semantic_probs(features)")
            self._rows_blended = len(p)
        return self._blend(p, q)

    def _blend(self, p: Tensor, q: Tensor) -> Tensor:
        if self.blend_mode == "off":
            return p
        dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
        with torch.autocast(p.device.type, enabled=False):
            p, q = p.to(dtype), q.to(dtype)
            w = self.blend_weights()[p.argmax(dim=-1)].unsqueeze(-1).to(dtype)
            return (1.0 - w) * p + w * q

    @torch.no_grad()
    def observe(self, pseudo_labels: Tensor) -> None:
        """Count this step's final hard pseudo-labels (integer (B,), all of them, not only
        the confident ones); every ``dist_window`` calls, m_hat becomes the normalised
        histogram of the labels of those calls and the window restarts. Under
        ``torch.distributed`` every rank's labels are counted (a collective).

        With ``check_inputs``: labels outside [0, K) are refused, and so is a batch of
        another length than the last ``blend`` saw (``labels[mask]``, only the confident
        ones, would bias ``m_hat`` towards the head classes); nothing changes before."""
        _check_labels(pseudo_labels, "observe", "pseudo_labels", None)
        if self.check_inputs:
            self._check_whole_batch(len(pseudo_labels))
        labels = all_gather_cat(pseudo_labels.detach())
        labels = labels.to(self.window_counts.device).long()
        if self.check_inputs:
            self._check_label_range(labels, "observe", "pseudo_labels")
            self._rows_blended = None
        self.window_counts.scatter_add_(0, labels, torch.ones_like(labels))
        self.num_observed.add_(1)
        total = self.window_counts.sum()
        update = (self.num_observed % self.dist_window == 0) & (total > 0)
        new = self.window_counts.to(self.m_hat.dtype) / total.clamp_min(1).to(self.m_hat.dtype)
        self.m_hat.copy_(torch.where(update, new, self.m_hat))
        end_of_window = self.num_observed % self.dist_window == 0
        self.window_counts.masked_fill_(end_of_window, 0)

    # ------------------------------------------------------------------ alignment loss
    def alignment_loss(self, features_weak: Tensor, features_strong: Tensor) -> Tensor:
        """Semantic alignment loss ``align_weight * mean_b H(q_weak, q_strong)``; the weak
        target carries no gradient, the gradient flows into ``features_strong``. The two
        views must have the same shape (row i of each is the same image)."""
        self._check_pair(features_weak, features_strong)
        if self.check_inputs:
            self._check_queued("alignment_loss")
            _check_finite_rows(features_weak, "alignment_loss", "features_weak")
            _check_finite_rows(features_strong, "alignment_loss", "features_strong")
        return self._alignment_loss(features_weak, features_strong)

    def _alignment_loss(self, features_weak: Tensor, features_strong: Tensor) -> Tensor:
        with torch.no_grad():
            target = self._similarity_logits(features_weak.detach()).softmax(dim=-1)
        log_q_strong = F.log_softmax(self._similarity_logits(features_strong), dim=-1)
        per_image = -(target * log_q_strong).sum(dim=-1)
        loss = per_image.sum() if per_image.numel() == 0 else per_image.mean()
        return self.align_weight * loss

    def active(self, step: int | None = None) -> bool:
        """False during the warm-up: 0-based ``step < warmup_iters``. Without ``step``, the
        step is DASO's own checkpointed count of ``observe`` calls, so call it before this
        step's ``observe`` (it reads a tensor: one host sync)."""
        if step is None:
            step = int(self.num_observed)
        return step >= self.warmup_iters

    def _check_features(self, features: Tensor, method: str, arg: str) -> None:
        if not isinstance(features, Tensor) or features.ndim != 2 \
                or features.shape[1] != self.feat_dim or not features.is_floating_point():
            raise ValueError(f"DASO.{method}: {arg} must be a float (N, feat_dim) tensor with "
                             f"feat_dim={self.feat_dim}, got {_describe(features)}")

    def _check_pair(self, features_weak: Tensor, features_strong: Tensor) -> None:
        """Both views (B, feat_dim) of the same B images: no broadcasting of one row."""
        self._check_features(features_weak, "alignment_loss", "features_weak")
        self._check_features(features_strong, "alignment_loss", "features_strong")
        if features_weak.shape != features_strong.shape:
            raise ValueError(f"DASO.alignment_loss: features_weak and features_strong must be "
                             f"the weak and strong views of the same images (same shape), got "
                             f"{tuple(features_weak.shape)} and {tuple(features_strong.shape)}")

    def _check_label_range(self, labels: Tensor, method: str, arg: str) -> None:
        """Class indices in [0, K) (one host sync)."""
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise UserError(f"DASO.{method}: {arg} must be class indices in [0, "
                            f"{self.num_classes - 1}] (num_classes={self.num_classes}), got "
                            f"{int(labels[bad][0])}; nothing was changed")

    def _check_queued(self, method: str) -> None:
        """At least one class queue holds a feature (one host sync)."""
        if not bool((self.queue_len > 0).any()):
            raise UserError(f"DASO.{method}: every class queue is empty, so every prototype is "
                            f"zero and the semantic pseudo-label would be uniform; call "
                            f"daso.enqueue(ema_features, labels) with the labeled batch first "
                            f"in each step")

    def _check_whole_batch(self, rows: int) -> None:
        """``observe`` gets as many labels as the last ``blend`` had rows."""
        if self._rows_blended is not None and rows != self._rows_blended:
            raise UserError(f"DASO.observe: got {rows} pseudo-labels but the last blend had "
                            f"{self._rows_blended} rows; pass every final hard label of the "
                            f"batch (probs.argmax(dim=-1)), not only the confident ones "
                            f"(labels[mask] biases m_hat); nothing was changed")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        """A state without DASO's buffers would silently restart the warm-up: a warning that
        names the fix (``strict=True``, the default, then also refuses the missing keys)."""
        own = [name for name in self._buffers if name not in self._non_persistent_buffers_set]
        absent = [name for name in own if prefix + name not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if absent:
            warnings.warn(f"DASO's state ({', '.join(absent)}) is missing from the loaded state "
                          f"dict, so its queues, m_hat and step count restart and the warm-up "
                          f"({self.warmup_iters} steps) runs again; save daso.state_dict() in "
                          f"your checkpoint and load it on resume", UserWarning, stacklevel=4)


def _check_labels(labels: Tensor, method: str, arg: str, n: int | None) -> None:
    """An integer (N,) tensor of class indices; ``n``: the expected N (None: any)."""
    ok = (isinstance(labels, Tensor) and labels.ndim == 1 and not labels.is_floating_point()
          and not labels.is_complex() and labels.dtype != torch.bool
          and (n is None or len(labels) == n))
    if not ok:
        expected = "(N,)" if n is None else f"({n},), one per feature row"
        raise ValueError(f"DASO.{method}: {arg} must be an integer tensor of shape {expected} "
                         f"holding class indices (e.g. probs.argmax(dim=-1)), got "
                         f"{_describe(labels)}")


def _check_finite_rows(features: Tensor, method: str, arg: str) -> None:
    """Every value finite (one host sync): a NaN row would poison its class prototype."""
    finite = torch.isfinite(features.detach()).all(dim=-1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten()
        raise UserError(f"DASO.{method}: {arg} has {len(rows)} row(s) with NaN or inf values "
                        f"(first: row {int(rows[0])}); check the model's features (a "
                        f"diverging loss?); nothing was changed")


def _check_probabilities(x: Tensor, arg: str, fix: str) -> None:
    """Rows of non-negative finite numbers summing to 1 (one host sync)."""
    x = x.detach()
    tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 2e-2
    sums = x.float().sum(dim=-1)
    ok = torch.isfinite(x).all() & (x >= 0).all() & ((sums - 1).abs() <= tol).all()
    if not bool(ok):
        worst = float(sums[(sums - 1).abs().argmax()]) if len(sums) else float("nan")
        raise UserError(f"DASO.blend: {arg} must be probabilities (rows >= 0 that sum to 1), "
                        f"got min {float(x.min()):.3g} and a row summing to {worst:.3g}: pass "
                        f"{fix} (softmax of the logits), not the logits")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"DASO: {name} must be {rule}, got {value!r}")


__all__ = ["BLEND_MODES", "DASO", "DASOConfig", "DASOEngineHooks"]
