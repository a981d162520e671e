"""CoSSL (Fan et al., CVPR 2022): co-learning of representation and classifier for imbalanced
semi-supervised learning, on FixMatch (default), MixMatch or ReMixMatch (``algorithm.base``).

Two phases in one run (official: ``train_cifar_fix.py`` for 400 epochs, then
``train_cifar_fix_cossl.py`` for 100 epochs from its checkpoint_401, both 500 iterations an
epoch; run_cifar10.sh):

1. pre-training: FixMatch, unchanged, for ``pretrain_fraction`` of the iterations;
2. the switch (``switch_phase``, the trainer's phase hook): the classifier warm-up of official
   ``utils/tfe_init.py`` (``classifier_warmup``): features of the labeled and unlabeled sets
   from the EMA encoder, a weight-imprinted classifier scores them, tail-class feature
   enhancement (TFE, paper Sec. 3.2) builds a class-balanced feature set, and a fresh linear
   classifier (with an EMA copy) trains on it;
3. co-learning (paper Sec. 3, Fig. 2): each step the balanced classifier ("teacher head")
   labels the weak view from the EMA encoder's features (pseudo-label module), FixMatch trains
   the encoder on them (representation module), and the teacher head trains on TFE-mixed
   features of a class-balanced labeled batch (classifier module):
       z~ = lam z_x + (1 - lam) z_u  with probability  (N_max - N_y) / N_max,  lam ~ U(max_lam, 1)
   Evaluation reads the EMA encoder with the EMA teacher head (official ``validate_teacher``).

The teacher head is a head of the network (``cossl``): its gradient comes only from the
classifier loss (its inputs are detached EMA features), and the encoder's only from FixMatch's.

Bases (``algorithm.base``; official ``train_cifar_{fix,mix,remix}.py`` pre-train,
``train_cifar_{fix,mix,remix}_cossl.py`` co-learn): the registry builds the learner of the base
(``cossl_learner``). Pre-training is the base's own step (imbssl's ``FixMatch``, ``MixMatch``,
``ReMixMatch``); the switch and the classifier module are the same for every base; the
co-learning step keeps the base's losses but takes its guessed labels from the teacher head on
the EMA encoder's features (the pseudo-label module):

* MixMatch (``train_cifar_mix_cossl.py``): q = Sharpen(1/K sum_k softmax(teacher(ema(u_k))), T),
  MixUp of [x, u_1, u_2], ``L_x + L_u`` (the MixMatch_Loss weight is dropped: Lu weight 1,
  ``colearn_lambda_u``); the warm-up scores and takes the features of the same weak view.
* ReMixMatch (``train_cifar_remix_cossl.py``): q = Sharpen(DA(softmax(teacher(ema(u_w)))), T)
  with the alignment's running mean restarted at the switch; MixUp of [x, u_w, u_s1, u_s2];
  ``L_x + lambda_u L_u + lambda_rot L_rot + lambda_kl L_kl`` without ramp-up
  (``ReMixMatch_Loss(lambda_u, 0)``, ``linear_rampup(., 0) = 1``); the warm-up's labeled
  features come from the strong view (``remix_cifar10``'s labeled transform).

Fields left null in configs/algorithm/cossl.yaml (``uratio``, ``lambda_u``, ``dist_align``,
``colearn_lambda_u``) take the base's official value (``BASE_DEFAULTS``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from imbssl.algorithms import register
from imbssl.algorithms.abc import linear_head
from imbssl.algorithms.base import (
    Batch,
    StepState,
    TrainingData,
    fill_null_fields,
    reject_setting,
)
from imbssl.algorithms.fixmatch import FixMatch, FixMatchConfig, fixmatch_mask
from imbssl.algorithms.mixmatch import MixMatch, MixMatchConfig, mix_batches
from imbssl.algorithms.ops import linear_rampup, mixup, one_hot, rotate_batch, sharpen
from imbssl.algorithms.ops import soft_cross_entropy as per_row_soft_ce
from imbssl.algorithms.remixmatch import ReMixMatch, ReMixMatchConfig
from imbssl.collectives import all_reduce_mean
from imbssl.data.device_loader import BatchStream, ClassBalancedStream, TensorSet
from imbssl.errors import UserError
from imbssl.pseudo.base import add_extra_loss

COSSL_HEAD = "cossl"
BASES = ("fixmatch", "mixmatch", "remixmatch")
#: the base's own value of each field left null (official CoSSL code, run_cifar10.sh)
BASE_DEFAULTS = {
    # train_cifar_fix(_cossl).py: FixMatch_Loss Lx + Lu; no alignment; DASO protocol mu 2
    "fixmatch": {"uratio": 2, "lambda_u": 1.0, "dist_align": "none"},
    # train_cifar_mix.py --lambda-u 75 (pre-training); co-learning loss = Lx + Lu
    # (train_cifar_mix_cossl.py); unlabeled batch 64 = labeled batch (--batch-size 64)
    "mixmatch": {"uratio": 1, "lambda_u": 75.0, "dist_align": "none", "colearn_lambda_u": 1.0},
    # train_cifar_remix(_cossl).py --lambda-u 1.5; run_cifar10.sh --align; batch 64 + 64
    "remixmatch": {"uratio": 1, "lambda_u": 1.5, "dist_align": "labeled"},
}


@dataclass
class CoSSLConfig(FixMatchConfig):
    name: str = "cossl"
    base: str = "fixmatch"  # the representation learner: fixmatch | mixmatch | remixmatch
    # null: the base's value (BASE_DEFAULTS, resolved in __post_init__)
    uratio: int | None = None
    lambda_u: float | None = None
    dist_align: str | None = None
    colearn_lambda_u: float | None = None  # unlabeled-loss weight in co-learning (null: lambda_u)
    pretrain_fraction: float = 0.8  # official: co-learning resumes checkpoint_401 (400 of 500 epochs)
    max_lam: float = 0.6  # lower end of lam ~ U(max_lam, 1): run_cifar10.sh --max_lam 0.6
    warm_iterations: int = 5000  # classifier warm-up: --warm_tfe 10 epochs x --val-iteration 500
    warm_lr: float = 0.002  # warm-up Adam: --lr_tfe 0.002
    warm_weight_decay: float = 5e-4  # warm-up Adam, classifier weight only: --wd_tfe 5e-4
    warm_batch_size: int = 64  # warm-up batches: --batch-size 64
    warm_ema_decay: float = 0.999  # EMA of the warm-up classifier: --ema-decay 0.999
    tfe_beta: float = 0.75  # warm-up TFE lam ~ Beta(0.75, 0.75): tfe_init.py TFE()
    # MixMatch / ReMixMatch bases (official train_cifar_mix.py, train_cifar_remix.py)
    temperature: float = 0.5  # --T 0.5
    mixup_alpha: float = 0.75  # --mix_alpha 0.75
    lambda_kl: float = ReMixMatchConfig.lambda_kl  # --w_ent 0.5 (pre-MixUp loss, ReMixMatch)
    lambda_rot: float = ReMixMatchConfig.lambda_rot  # --w_rot 0.5 (ReMixMatch)
    rampup_ratio: float = 1.0  # pre-training ramp over the whole 500 epochs (args.epochs)
    passes: str = ReMixMatchConfig.passes
    num_views: int = MixMatchConfig.num_views  # MixMatch K = 2 (TransformTwice)
    mixup_mode: str = MixMatchConfig.mixup_mode
    guess_with_ema: bool = MixMatchConfig.guess_with_ema

    def __post_init__(self) -> None:
        """Null fields take the base's value; an unknown base is left to ``cossl_learner``."""
        own = BASE_DEFAULTS.get(self.base)
        if own is None:
            return
        fill_null_fields(self, own)
        if self.colearn_lambda_u is None:
            self.colearn_lambda_u = self.lambda_u


def check_base(cfg: CoSSLConfig) -> None:
    """One-line errors for a base CoSSL has no co-learning step for, and its bad settings."""
    if cfg.base not in BASES:
        raise UserError(f"algorithm.base={cfg.base} is not available for CoSSL; use one of "
                        f"{', '.join(BASES)}")
    if cfg.base == "mixmatch" and cfg.dist_align != "none":
        raise UserError(f"algorithm.dist_align={cfg.dist_align} does not apply to CoSSL on "
                        "MixMatch (it has no distribution alignment); set algorithm.dist_align"
                        "=none")


def tfe_probability(labeled_counts: Tensor) -> Tensor:
    """(N_max - N_k) / N_max per class: the probability that a labeled feature of class k is
    mixed (official ``train``: ``tfe_prob``); 0 for the largest class."""
    counts = labeled_counts.float()
    return (counts.max() - counts) / counts.max()


def tfe_mix(feats_x: Tensor, labels_x: Tensor, feats_u: Tensor, mixed: Tensor,
            lam: Tensor) -> Tensor:
    """Co-learning TFE (paper Eq. 4; official ``train``): where ``mixed``, the labeled feature
    becomes ``lam z_x + (1 - lam) z_u`` with the unlabeled feature of the same row; its label
    stays. ``mixed`` (B,) bool, ``lam`` (B,) in [max_lam, 1]."""
    lam = lam.to(feats_x.dtype).unsqueeze(1)
    blend = lam * feats_x + (1 - lam) * feats_u[:len(feats_x)]
    return torch.where(mixed.unsqueeze(1), blend, feats_x)


def tfe_draws(n: int, max_lam: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(u, lam) of ``n`` rows for ``tfe_mix``: a row of class y mixes where ``u < tfe_prob[y]``
    (``u ~ U(0, 1)``), with ``lam ~ U(max_lam, 1)``; drawn on the CPU from ``generator``."""
    u = torch.rand(n, generator=generator)
    lam = max_lam + (1 - max_lam) * torch.rand(n, generator=generator)
    return u, lam


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-1/B sum_b sum_k t_bk log softmax(l_b)_k (official ``teacher_loss``, ``classifier_train``)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def imprinted_weights(feats: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, D) class means of the labeled features, each of unit L2 norm (official
    ``weight_imprint``; the bias-free classifier that scores features for TFE)."""
    rows = [feats[labels == k].mean(0) for k in range(num_classes)]
    return torch.stack([r / r.norm(p=2) for r in rows])


def tfe_feature_set(feats_l: Tensor, labels_l: Tensor, probs_l: Tensor, feats_u: Tensor,
                    probs_u: Tensor, counts: list[int], draws) -> tuple[Tensor, Tensor]:
    """The class-balanced feature set of the warm-up (official ``TFE`` in tfe_init.py): the
    labeled features plus, for each class k below the largest, N_max - N_k features
    ``lam z_a + (1 - lam) z_b``: z_a a labeled feature of class k (drawn with replacement),
    z_b the next of the other classes' labeled and all unlabeled features ranked by their
    probability of class k, lam ~ Beta. ``draws(k, n_k, size) -> (a_idx, lam)`` gives the
    random numbers. Returns (features, one-hot targets)."""
    k_total = probs_l.shape[1]
    features, targets = [feats_l], [F.one_hot(labels_l, k_total).float()]
    for k in range(k_total):
        size = max(counts) - counts[k]
        if size <= 0:
            continue
        current = feats_l[labels_l == k]
        others = torch.cat([feats_l[labels_l != k], feats_u])
        other_probs = torch.cat([probs_l[labels_l != k, k], probs_u[:, k]])
        order = other_probs.sort(descending=True).indices  # most class-k-like first
        a_idx, lam = draws(k, len(current), size)
        lam = lam.to(feats_l).unsqueeze(1)
        features.append(lam * current[a_idx] + (1 - lam) * others[order[:size]])
        targets.append(F.one_hot(torch.full((size,), k, dtype=torch.long,
                                            device=feats_l.device), k_total).float())
    return torch.cat(features), torch.cat(targets)


def train_warm_classifier(head: nn.Linear, ema_head: nn.Linear, feats: Tensor, targets: Tensor,
                          cfg: CoSSLConfig, generator: torch.Generator) -> float:
    """Official ``classifier_warmup``: Adam (weight decay on the weight only) on shuffled
    batches of the fixed feature set (drop_last, reshuffled each epoch), an EMA copy after each
    step (WeightEMA without weight decay). Returns the last batch's loss."""
    opt = torch.optim.Adam([{"params": [head.weight], "weight_decay": cfg.warm_weight_decay},
                            {"params": [head.bias], "weight_decay": 0.0}], lr=cfg.warm_lr)
    batch = min(cfg.warm_batch_size, len(feats))
    order, pos, loss = torch.empty(0, dtype=torch.long), len(feats), torch.zeros(())
    for _ in range(cfg.warm_iterations):
        if pos + batch > len(feats):
            order, pos = torch.randperm(len(feats), generator=generator), 0
        idx = order[pos:pos + batch].to(feats.device)
        pos += batch
        loss = soft_cross_entropy(head(feats[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema_head.parameters(), head.parameters(), strict=True):
                e.mul_(cfg.warm_ema_decay).add_(p * (1 - cfg.warm_ema_decay))
    return float(loss.detach())


def draw_rotations(n: int, device) -> Tensor:
    """r ~ U{0, 1, 2, 3} (x 90 degrees) per image of the rotation loss (official ``targets_r``)."""
    return torch.randint(0, 4, (n,), device=device)


class CoLearning:
    """CoSSL's phases around a base learner (mixed in before FixMatch, MixMatch or ReMixMatch):
    the switch (classifier warm-up), the classifier module, the teacher head's predictions, the
    extra state. The base's ``step`` pre-trains; ``co_learning_step`` is the base's own."""

    #: warm-up views (official ``classifier_warmup`` datasets): labeled features, unlabeled
    #: features, unlabeled scores (None: scored on the features' own view)
    warm_views: ClassVar[tuple[str, str, str | None]] = ("weak", "strong", "weak")

    def __init__(self, cfg: CoSSLConfig, num_classes: int, feat_dim: int,
                 labeled_labels: Tensor, refiner=None):
        check_base(cfg)
        reject_setting(cfg, "pretrain_fraction", "in (0, 1)",
                       not 0.0 < cfg.pretrain_fraction < 1.0)
        reject_setting(cfg, "max_lam", "in [0, 1]", not 0.0 <= cfg.max_lam <= 1.0)
        reject_setting(cfg, "warm_iterations", ">= 0", cfg.warm_iterations < 0)
        reject_setting(cfg, "warm_batch_size", ">= 1", cfg.warm_batch_size < 1)
        reject_setting(cfg, "warm_lr", "> 0", cfg.warm_lr <= 0)
        reject_setting(cfg, "warm_ema_decay", "in [0, 1]", not 0.0 <= cfg.warm_ema_decay <= 1.0)
        reject_setting(cfg, "tfe_beta", "> 0", cfg.tfe_beta <= 0)
        reject_setting(cfg, "colearn_lambda_u", ">= 0", cfg.colearn_lambda_u < 0)
        super().__init__(cfg, num_classes, feat_dim, labeled_labels, refiner)
        counts = torch.bincount(labeled_labels.long().cpu(), minlength=num_classes)
        if bool((counts == 0).any()):
            raise ValueError("CoSSL needs every class in the labeled set (class means for the "
                             "imprinted classifier); raise dataset.n1")
        self.labeled_counts = counts.tolist()
        self.register_buffer("tfe_prob", tfe_probability(counts), persistent=False)
        self.co_learning = False  # phase 2 started (saved in the extra state)
        self.data: TrainingData | None = None
        self.draw_gen = torch.Generator().manual_seed(0)  # TFE draws and the warm-up (CPU)
        self.aug_gen: torch.Generator | None = None  # the classifier batches' augmentation
        self.balanced_stream = self.full_stream = None

    # ------------------------------------------------------------- data and phases
    def attach_data(self, data: TrainingData) -> None:
        """Keep the data; the classifier streams (official ``crt_labeled_loader``: labeled,
        class-balanced; ``crt_full_loader``: labeled + unlabeled, shuffled; both strongly
        augmented, batch size of the labeled batch) and the generators, seeded from the run."""
        self.data = data
        device = data.labeled.images.device
        seed = int(data.seed) * 1000
        self.draw_gen = torch.Generator().manual_seed(seed + 11)
        self.aug_gen = torch.Generator(device=device)
        self.aug_gen.manual_seed(seed + 12)
        full = TensorSet(torch.cat([data.labeled.images, data.unlabeled.images]),
                         torch.cat([data.labeled.labels, data.unlabeled.labels]))
        self.balanced_stream = ClassBalancedStream(data.labeled, data.batch_size, seed + 13)
        self.full_stream = BatchStream(full, data.batch_size, seed + 14)

    def switch_step(self, total: int) -> int:
        """The step after which co-learning starts: ``pretrain_fraction`` of the run."""
        return max(1, round(self.cfg.pretrain_fraction * total))

    def phase_switch_due(self, step: int, total: int) -> bool:
        return not self.co_learning and step == self.switch_step(total)

    @torch.no_grad()
    def _features(self, ema_model: nn.Module, images: Tensor, view: str):
        """(features, logits) of the EMA network in eval mode on ``view`` of ``images``."""
        aug, bs = self.data.augmenter, self.data.eval_batch_size
        was_training = ema_model.training
        ema_model.eval()
        feats = []
        for start in range(0, len(images), bs):
            x = aug.view(view, images[start:start + bs], self.aug_gen)
            feats.append(ema_model(x).features.float())
        ema_model.train(was_training)
        return torch.cat(feats)

    def switch_phase(self, model: nn.Module, ema_model: nn.Module) -> dict:
        """The classifier warm-up (official ``classifier_warmup``), then co-learning."""
        if self.data is None:
            raise RuntimeError("CoSSL's warm-up needs attach_data first")
        labeled, unlabeled = self.data.labeled, self.data.unlabeled
        labeled_view, feature_view, score_view = self.warm_views
        feats_l = self._features(ema_model, labeled.images, labeled_view)
        feats_scored = (self._features(ema_model, unlabeled.images, score_view)
                        if score_view is not None else None)
        feats_u = self._features(ema_model, unlabeled.images, feature_view)
        if feats_scored is None:  # MixMatch: scored on the features' own weak view
            feats_scored = feats_u
        weights = imprinted_weights(feats_l, labeled.labels, self.num_classes)
        probs_l = torch.softmax(feats_l @ weights.T, dim=1)
        probs_u = torch.softmax(feats_scored @ weights.T, dim=1)
        feats, targets = tfe_feature_set(feats_l, labeled.labels, probs_l, feats_u, probs_u,
                                         self.labeled_counts, self._warm_draws)
        head, ema_head = self._fresh_heads(feats.device)
        with torch.enable_grad():
            loss = train_warm_classifier(head, ema_head, feats, targets, self.cfg, self.draw_gen)
        with torch.no_grad():  # processes agree to the bit (identity for one process)
            for part in (*head.parameters(), *ema_head.parameters()):
                part.copy_(all_reduce_mean(part))
            model.heads[COSSL_HEAD].load_state_dict(head.state_dict())
            ema_model.heads[COSSL_HEAD].load_state_dict(ema_head.state_dict())
        self.co_learning = True
        return {"cossl/tfe_features": len(feats), "cossl/warm_loss": loss}

    def _warm_draws(self, k: int, n_k: int, size: int) -> tuple[Tensor, Tensor]:
        """Warm-up TFE draws: ``size`` indices among ``n_k`` (with replacement), lam ~ Beta
        (numpy's Beta sampler seeded from the algorithm's generator: no global RNG moves)."""
        a_idx = torch.randint(n_k, (size,), generator=self.draw_gen)
        seed = int(torch.randint(2**31, (1,), generator=self.draw_gen))
        lam = np.random.RandomState(seed).beta(self.cfg.tfe_beta, self.cfg.tfe_beta, size)
        return a_idx, torch.as_tensor(lam, dtype=torch.float32)

    def _fresh_heads(self, device) -> tuple[nn.Linear, nn.Linear]:
        """A freshly initialised classifier (official ``model.output.reset_parameters()``: the
        nn.Linear default, Kaiming-uniform weight, uniform bias in +-1/sqrt(D)) from the
        algorithm's generator, and its EMA copy."""
        with torch.random.fork_rng(devices=[]):  # the constructor's own init leaves no trace
            head, ema_head = nn.Linear(self.feat_dim, self.num_classes), nn.Linear(
                self.feat_dim, self.num_classes)
        bound = 1 / math.sqrt(self.feat_dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=self.draw_gen)
            nn.init.uniform_(head.bias, -bound, bound, generator=self.draw_gen)
        head, ema_head = head.to(device), ema_head.to(device)
        ema_head.load_state_dict(head.state_dict())
        ema_head.requires_grad_(False)
        return head, ema_head

    def get_extra_state(self) -> dict:
        """The phase and the co-learning streams' and generators' positions (exact resume)."""
        state = {"co_learning": self.co_learning, "draw_gen": self.draw_gen.get_state()}
        if self.balanced_stream is not None:
            state.update(aug_gen=self.aug_gen.get_state(),
                         balanced_stream=self.balanced_stream.state_dict(),
                         full_stream=self.full_stream.state_dict())
        return state

    def set_extra_state(self, state: dict) -> None:
        self.co_learning = bool(state["co_learning"])
        self.draw_gen.set_state(torch.as_tensor(state["draw_gen"]).cpu())
        if self.balanced_stream is not None and "balanced_stream" in state:
            self.aug_gen.set_state(torch.as_tensor(state["aug_gen"]).cpu())
            self.balanced_stream.load_state_dict(state["balanced_stream"])
            self.full_stream.load_state_dict(state["full_stream"])

    # ------------------------------------------------------------- predictions
    def eval_predictor(self, model: nn.Module):
        """Pre-training: the network's classifier; co-learning: the balanced classifier on
        the features (official ``validate_teacher`` with the EMA network and ``ema_teacher``)."""
        if not self.co_learning:
            return self.eval_logits
        head = model.heads[COSSL_HEAD]
        return lambda output: head(output.features)

    def label_predictor(self, model: nn.Module):
        return self.eval_predictor(model)

    def per_class_diagnostics(self) -> dict[str, dict[str, Tensor]]:
        """The refiner's state, and the per-class TFE probability (kind ``cossl``)."""
        parts = super().per_class_diagnostics()
        parts["cossl"] = {"tfe_probability": self.tfe_prob.clone()}
        return parts

    # ------------------------------------------------------------- the step
    def step(self, batch: Batch, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.co_learning:
            loss, logs = super().step(batch, state)
            return loss, {**logs, "cossl/co_learning": torch.zeros((), device=loss.device)}
        return self.co_learning_step(batch, state)

    def co_learning_step(self, batch: Batch, state: StepState
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def teacher_probs(self, head: nn.Module, ema_model: nn.Module, *views: Tensor
                      ) -> tuple[list[Tensor], Tensor]:
        """The pseudo-label module: softmax of the teacher head on the EMA encoder's features
        of each view (one pass; official ``teacher_head(ema_model(u, return_feature=True))``);
        returns (probabilities per view, the features of the first view)."""
        out = ema_model(torch.cat(views))
        feats = out.features.split([len(v) for v in views])
        probs = [torch.softmax(head(f.to(head.weight.dtype)).float(), dim=1) for f in feats]
        return probs, feats[0]

    def co_learning_logs(self, loss_c: Tensor, acc_c: Tensor, device) -> dict[str, Tensor]:
        return {"loss/classifier": loss_c.detach(), "cossl/classifier_acc": acc_c,
                "cossl/co_learning": torch.ones((), device=device)}

    def classifier_loss(self, head: nn.Module, ema_model: nn.Module) -> tuple[Tensor, Tensor]:
        """The classifier module: a class-balanced labeled batch and a labeled + unlabeled
        batch, both strongly augmented, through the EMA encoder; TFE mixes their features
        (``tfe_mix``); soft cross-entropy of the teacher head. Returns (loss, accuracy)."""
        aug = self.data.augmenter
        x, y, _ = self.balanced_stream.next()
        u, _, _ = self.full_stream.next()
        with torch.no_grad():
            both = aug.strong(torch.cat([x, u]), self.aug_gen)
            feats_x, feats_u = ema_model(both).features.float().split([len(x), len(u)])
            u, lam = (v.to(y.device) for v in tfe_draws(len(y), self.cfg.max_lam,
                                                         self.draw_gen))
            feats = tfe_mix(feats_x, y, feats_u, u < self.tfe_prob[y], lam)
        logits = head(feats.to(head.weight.dtype))
        loss = soft_cross_entropy(logits, F.one_hot(y, self.num_classes).float())
        acc = (logits.detach().argmax(1) == y).float().mean()
        return loss, acc


def cossl_learner(cfg: CoSSLConfig) -> type:
    """The class ``algorithm=cossl`` trains with: the co-learning of base ``cfg.base``."""
    check_base(cfg)
    return {"fixmatch": CoSSL, "mixmatch": MixMatchCoSSL, "remixmatch": ReMixMatchCoSSL}[cfg.base]


@register("cossl", learner=cossl_learner)
class CoSSL(CoLearning, FixMatch):
    """FixMatch pre-training, then co-learning with a TFE-trained balanced classifier (the
    class of ``algorithm=cossl``; other bases: ``MixMatchCoSSL``, ``ReMixMatchCoSSL``)."""

    Config = CoSSLConfig

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        """The balanced classifier (official ``teacher_head``); its EMA copy is the EMA
        network's head (official ``ema_teacher``); and the base's heads (ReMixMatch's
        rotation head)."""
        if cfg.base == "remixmatch" and cls is CoSSL:
            return ReMixMatchCoSSL.make_heads(cfg, feat_dim, num_classes)
        return {COSSL_HEAD: linear_head(feat_dim, num_classes)}

    def co_learning_step(self, batch: Batch, state: StepState
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        """Official ``train_cifar_fix_cossl.py`` ``train``: pseudo-labels from the teacher head
        on the EMA encoder's weak-view features, FixMatch's losses on the encoder, the TFE
        classifier loss on the teacher head."""
        cfg, head = self.cfg, state.model.heads[COSSL_HEAD]
        probe_logs, (logits_x, _), (_, feats_w), (logits_s, feats_s) = \
            self.forward_views(batch, state)
        loss_x = self.labeled_loss(logits_x, batch.y_lb)
        with torch.no_grad():
            ema_feats = state.ema_model(batch.x_ulb[0]).features
            teacher_logits = head(ema_feats.to(head.weight.dtype))
            probs, linear = self.weak_view_probs(teacher_logits, feats_w, state.step)
            mask, pseudo = fixmatch_mask(probs, cfg.threshold)
        self.refiner.observe(pseudo)
        loss_u = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * mask).mean()
        loss_c, acc_c = self.classifier_loss(head, state.ema_model)
        loss = loss_x + cfg.colearn_lambda_u * loss_u + loss_c
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                **self.co_learning_logs(loss_c, acc_c, loss.device),
                "mask/ratio": mask.mean(), "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": mask, **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(feats_w, feats_s, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs


class MixMatchCoSSL(CoLearning, MixMatch):
    """CoSSL on MixMatch (official ``train_cifar_mix.py`` then ``train_cifar_mix_cossl.py``):
    the class ``algorithm=cossl`` trains with ``algorithm.base=mixmatch``."""

    Config = CoSSLConfig
    registered_name = "cossl"
    warm_views = ("weak", "weak", None)  # tfe_init.py TFE(): MixMatch's weak view only

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {COSSL_HEAD: linear_head(feat_dim, num_classes)}

    def co_learning_step(self, batch: Batch, state: StepState
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        """Official ``train_cifar_mix_cossl.py`` ``train``: the guess is the sharpened mean of
        the teacher head's softmax on the EMA features of the K weak views; MixUp of
        [x, u_1, .., u_K]; L_x (soft CE) + colearn_lambda_u * L_u (squared error)."""
        cfg, head = self.cfg, state.model.heads[COSSL_HEAD]
        self.feed_refiner(batch, state)
        with torch.no_grad():
            probs, ema_feats_1 = self.teacher_probs(head, state.ema_model, *batch.x_ulb)
            avg = torch.stack(probs).mean(0)  # (softmax(u_1) + softmax(u_2)) / 2
            linear = avg.argmax(dim=-1)
            targets_u = sharpen(avg, cfg.temperature)  # MixMatch Eq. 7
            # DASO: the semantic label of view 1's EMA features (those the teacher reads)
            targets_u = self.refiner.refine(targets_u, ema_feats_1, state.step)
            pseudo = targets_u.argmax(dim=-1)
        self.refiner.observe(pseudo)
        loss_c, acc_c = self.classifier_loss(head, state.ema_model)

        n_lb, k = batch.x_lb.size(0), len(batch.x_ulb)
        x_mix, y_mix, lam = mix_batches(
            batch.x_lb, one_hot(batch.y_lb, self.num_classes), torch.cat(batch.x_ulb),
            targets_u.repeat(k, 1), cfg.mixup_mode, cfg.mixup_alpha)
        logits = state.model(x_mix).logits.float()
        loss_x = per_row_soft_ce(self.labeled_logits(logits[:n_lb]), y_mix[:n_lb]).mean()
        loss_u = F.mse_loss(torch.softmax(logits[n_lb:], -1), y_mix[n_lb:])  # MixMatch Eq. 4
        loss = loss_x + cfg.colearn_lambda_u * loss_u + loss_c  # official: Lx + Lu
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                **self.co_learning_logs(loss_c, acc_c, loss.device), "mixup/lambda": lam,
                "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": torch.ones_like(avg[:, 0])}
        logs.update(self.refiner.pseudo_logs())  # no alignment loss (as imbssl's MixMatch)
        return loss, logs


class ReMixMatchCoSSL(CoLearning, ReMixMatch):
    """CoSSL on ReMixMatch (official ``train_cifar_remix.py --align`` then
    ``train_cifar_remix_cossl.py --align``): the class ``algorithm=cossl`` trains with
    ``algorithm.base=remixmatch``."""

    Config = CoSSLConfig
    registered_name = "cossl"
    warm_views = ("strong", "strong", "weak")  # remix_cifar10: labeled set strongly augmented

    @classmethod
    def make_heads(cls, cfg, feat_dim: int, num_classes: int) -> dict[str, nn.Module]:
        return {**ReMixMatch.make_heads(cfg, feat_dim, num_classes),
                COSSL_HEAD: linear_head(feat_dim, num_classes)}

    def consistency_ramp(self, state: StepState) -> float:
        """Pre-training: the ramp over ``rampup_ratio`` of the run; co-learning: none
        (official ``ReMixMatch_Loss(lambda_u, 0)``, ``linear_rampup(., 0)`` = 1)."""
        if self.co_learning:
            return 1.0
        return linear_rampup(state.step, state.total_steps, self.cfg.rampup_ratio)

    def switch_phase(self, model: nn.Module, ema_model: nn.Module) -> dict:
        """The warm-up; the alignment's running mean restarts (official co-learning script:
        ``emp_distb_u`` from the first co-learning batch on, now of the teacher's predictions)."""
        logs = super().switch_phase(model, ema_model)
        if self.dist_align is not None:
            self.dist_align.restart()
        return logs

    def co_learning_step(self, batch: Batch, state: StepState
                         ) -> tuple[Tensor, dict[str, Tensor]]:
        """Official ``train_cifar_remix_cossl.py`` ``train``: the guess is the teacher head's
        softmax on the EMA features of the weak view, aligned and sharpened; MixUp of
        [x, u_w, u_s1, u_s2]; L_x + lambda_u L_u + lambda_rot L_rot (rotated strong view 1)
        + lambda_kl L_kl (strong view 1 against the guess), no ramp-up."""
        cfg, model, head = self.cfg, state.model, state.model.heads[COSSL_HEAD]
        x_w, x_s1, x_s2 = batch.x_ulb
        self.feed_refiner(batch, state)
        probe_logs = self.probe_ctaugment(batch, state)
        with torch.no_grad():
            (probs,), ema_feats_w = self.teacher_probs(head, state.ema_model, x_w)
            linear = probs.argmax(dim=-1)
            if self.dist_align is not None:  # Normalize(q * p(y) / p~(y))  (ReMixMatch 3.1)
                probs = self.dist_align(probs)
            targets_u = sharpen(probs, cfg.temperature)
            targets_u = self.refiner.refine(targets_u, ema_feats_w, state.step)
            pseudo = targets_u.argmax(dim=-1)
        self.refiner.observe(pseudo)
        loss_c, acc_c = self.classifier_loss(head, state.ema_model)

        n_lb = batch.x_lb.size(0)
        x_all = torch.cat([batch.x_lb, x_w, x_s1, x_s2])
        y_all = torch.cat([one_hot(batch.y_lb, self.num_classes), targets_u, targets_u,
                           targets_u])
        x_mix, y_mix, lam = mixup(x_all, y_all, cfg.mixup_alpha)
        logits = model(x_mix).logits
        loss_x = per_row_soft_ce(self.labeled_logits(logits[:n_lb]), y_mix[:n_lb]).mean()
        loss_u = per_row_soft_ce(logits[n_lb:], y_mix[n_lb:]).mean()
        rot = draw_rotations(x_s1.size(0), x_s1.device)
        rot_logits = model.heads["rotation"](model(rotate_batch(x_s1, rot)).features)
        loss_rot = F.cross_entropy(rot_logits.float(), rot)
        out_s1 = model(x_s1)
        loss_kl = per_row_soft_ce(out_s1.logits, targets_u).mean()
        loss = (loss_x + cfg.colearn_lambda_u * loss_u + cfg.lambda_rot * loss_rot
                + cfg.lambda_kl * loss_kl + loss_c)
        logs = {"loss/labeled": loss_x.detach(), "loss/unlabeled": loss_u.detach(),
                "loss/premixup": loss_kl.detach(), "loss/rotation": loss_rot.detach(),
                **self.co_learning_logs(loss_c, acc_c, loss.device), "mixup/lambda": lam,
                "pseudo/linear": linear, "pseudo/final": pseudo,
                "pseudo/mask": torch.ones_like(probs[:, 0]), **probe_logs}
        extra, extra_logs = self.refiner.extra_loss(ema_feats_w, out_s1.features, state.step)
        loss = add_extra_loss(loss, logs, extra, extra_logs)
        logs.update(self.refiner.pseudo_logs())
        return loss, logs
