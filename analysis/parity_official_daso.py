"""Run the official DASO code beside ``imbssl.pseudo.daso.DASO`` on identical tensors.

    python analysis/parity_official_daso.py --official /path/to/daso-checkout
    python analysis/parity_official_daso.py --official /path/to/daso-checkout \\
        --out analysis/results/parity_official_daso.md

``--official`` is a checkout of github.com/ytaek-oh/daso; it is imported from where it lies,
never copied. What runs from it, unmodified:

* ``lib/algorithm/daso.py: DASO.run_step``: the training step, including when warm-up ends
  (``pretraining = False``) and when the pseudo-label distribution is refreshed
  (``update_pl_dist`` every ``PL_DIST_UPDATE_PERIOD`` iterations);
* ``lib/models/daso_model.py: DASOModel.forward_train``: the queue update with the EMA
  features of the labeled batch, the semantic pseudo-label, the distribution-aware blend, the
  confidence mask and the semantic alignment loss;
* ``lib/models/feature_queue.py: FeatureQueue`` (balanced queue, prototypes);
* ``lib/utils/dist_logger.py: DistributionLogger`` (``push_pl_list``, ``update_pl_dist``,
  ``get_pl_dist``: m_hat).

What is stubbed, so that random feature vectors stand in for images: the WRN encoder is the
identity (``build_wrn`` returns it), the EMA model is a fixed random linear map of the labeled
"images", ``SemiSupervised`` (data loaders, meters, optimizer) is a small host object, the
labeled loss is cross-entropy and the unlabeled loss contributes an exact zero gradient (so
the gradient on the strong view is the alignment loss's alone). yacs is replaced by a dict
class when it is not installed (the modules import ``CfgNode`` for type hints only).

Every step feeds the same tensors to both sides; the official side's intermediate values are
read from ``forward_train``'s local variables when it returns (``sys.setprofile``). The table
gives, per quantity, the largest absolute difference over all steps (or the fraction of equal
entries for labels and masks). Two settings: CIFAR-10-like (10 classes, T_dist 1.5) and
CIFAR-100-like (100 classes, T_dist 0.3, one class absent from the labeled batches until
after warm-up, so its prototype is zero for a while).
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imbssl.pseudo.daso import DASO  # noqa: E402

OFFICIAL_FILES = ("lib/algorithm/daso.py", "lib/models/daso_model.py",
                  "lib/models/feature_queue.py", "lib/utils/dist_logger.py")


@dataclass(frozen=True)
class Setting:
    name: str
    num_classes: int
    gamma: float             # labeled and unlabeled class imbalance of the random batches
    dist_temperature: float  # official fixmatch_daso.yaml DIST_TEMP
    late_class_until: int    # the last class is absent from labeled batches before this step
    feat_dim: int = 128      # official MODEL.QUEUE.FEAT_DIM (WRN-28-2)
    queue_size: int = 256    # official MODEL.QUEUE.MAX_SIZE
    proto_temperature: float = 0.05  # official ALGORITHM.DASO.PROTO_TEMP
    threshold: float = 0.95  # official ALGORITHM.CONFIDENCE_THRESHOLD
    labeled_batch: int = 64  # official SOLVER.IMS_PER_BATCH
    unlabeled_batch: int = 128  # x UNLABELED_BATCH_RATIO 2 (fixmatch_daso.yaml)
    steps: int = 400
    warmup: int = 100        # PRETRAIN_STEPS (5000 in the paper; short here)
    window: int = 50         # PL_DIST_UPDATE_PERIOD (100 in the paper; short here)


SETTINGS = (
    Setting("cifar10-like", num_classes=10, gamma=100.0, dist_temperature=1.5,
            late_class_until=0),
    Setting("cifar100-like", num_classes=100, gamma=10.0, dist_temperature=0.3,
            late_class_until=250),
)


# ---------------------------------------------------------------------- official code import
class _Node(dict):
    """Attribute-access dict, the part of yacs' CfgNode the official modules read."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


def _install_yacs_stub() -> None:
    try:
        import yacs.config  # noqa: F401
    except ImportError:
        yacs = types.ModuleType("yacs")
        config = types.ModuleType("yacs.config")
        config.CfgNode = _Node
        yacs.config = config
        sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config


class _IdentityEncoder(nn.Identity):
    """Stands in for the official WRN: the 'images' are already feature vectors."""

    def __init__(self, num_classes: int, out_features: int):
        super().__init__()
        self.num_classes = num_classes
        self.out_features = out_features


class _Sink:
    """Meters, timers, optimizer and writers of the official trainer: calls do nothing."""

    param_groups = [{"lr": 0.03}]

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _EMAStub(nn.Module):
    """The EMA model: a fixed random linear map of the labeled inputs (features only)."""

    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        self.weight = torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=generator)

    def forward(self, x, return_features=False, **kwargs):
        assert return_features
        return x.detach() @ self.weight.t()

    def update(self, model, step, current_lr):
        return 0.0


def import_official(official: Path):
    """The official DASO step (``DASO`` algorithm class), model class and distribution
    logger, imported from the checkout with the minimal stubs described above."""
    missing = [f for f in OFFICIAL_FILES if not (official / f).is_file()]
    if missing:
        raise SystemExit(f"--official {official}: not a DASO checkout (missing {missing[0]})")
    _install_yacs_stub()
    sys.path.insert(0, str(official))
    import lib.models.semi_model as semi_model
    from lib.models.daso_model import DASOModel
    from lib.utils.dist_logger import DistributionLogger

    semi_model.build_wrn = lambda cfg: _IdentityEncoder(cfg.MODEL.NUM_CLASSES,
                                                        cfg.MODEL.QUEUE.FEAT_DIM)
    # lib/algorithm/__init__.py imports every algorithm and the whole trainer stack: load
    # daso.py alone, with SemiSupervised replaced by the host base below
    package = types.ModuleType("lib.algorithm")
    package.__path__ = [str(official / "lib" / "algorithm")]
    base = types.ModuleType("lib.algorithm.base_ssl_algorithm")
    base.SemiSupervised = _HostBase
    sys.modules["lib.algorithm"] = package
    sys.modules["lib.algorithm.base_ssl_algorithm"] = base
    from lib.algorithm.daso import DASO as OfficialDASO
    return OfficialDASO, DASOModel, DistributionLogger


class _HostBase:
    """What ``SemiSupervised.__init__`` would set up, reduced to what ``run_step`` reads."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = "cpu"
        self.iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.model = cfg._parts["model_cls"](cfg)
        self.ema_model = cfg._parts["ema"]
        self.dist_logger = cfg._parts["logger_cls"](_Sink(), cfg.MODEL.NUM_CLASSES)
        self.l_loss = lambda logits, labels, **kw: F.cross_entropy(logits, labels)
        self.ul_loss = lambda logits, labels, weight=None, avg_factor=None: logits.sum() * 0.0
        self.optimizer = self.meters = self.iter_timer = self.scheduler = _Sink()
        self.apply_scheduler = False
        self._write_metrics = lambda *args, **kwargs: None

    def get_label_dist(self, device=None):
        return self.cfg._parts["class_count"]


def official_cfg(s: Setting, parts: dict) -> _Node:
    """The official config keys the DASO step reads, with the setting's values."""
    cfg = _Node(
        GPU_ID="cpu",
        MODEL=_Node(NUM_CLASSES=s.num_classes, WITH_ROTATION_HEAD=False,
                    QUEUE=_Node(FEAT_DIM=s.feat_dim, MAX_SIZE=s.queue_size)),
        ALGORITHM=_Node(
            CONFIDENCE_THRESHOLD=s.threshold,
            DASO=_Node(PRETRAIN_STEPS=s.warmup, PROTO_TEMP=s.proto_temperature,
                       PL_DIST_UPDATE_PERIOD=s.window, WITH_DIST_AWARE=True,
                       DIST_TEMP=s.dist_temperature, INTERP_ALPHA=0.5, PSA_LOSS_WEIGHT=1.0),
            LOGIT_ADJUST=_Node(APPLY=False, TAU=1.0), ABC=_Node(APPLY=False)),
        # one more than the steps run: the official step skips the m_hat refresh of the very
        # last iteration of training, which no later step could use
        SOLVER=_Node(MAX_ITER=s.steps + 1),
    )
    cfg["_parts"] = parts
    return cfg


# ---------------------------------------------------------------------- capture locals
class _LocalsCapture:
    """Keeps a copy of ``forward_train``'s local tensors when it returns."""

    def __init__(self, code):
        self.code = code
        self.values: dict[str, torch.Tensor] = {}

    def __call__(self, frame, event, arg):
        if event == "return" and frame.f_code is self.code:
            self.values = {k: v.detach().clone() for k, v in frame.f_locals.items()
                           if isinstance(v, torch.Tensor)}

    def __enter__(self):
        self.values = {}
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


# ---------------------------------------------------------------------- the comparison
class Stats:
    """Running maximum of absolute differences and counts of equal entries."""

    def __init__(self):
        self.max_diff: dict[str, float] = {}
        self.equal: dict[str, list[int]] = {}
        self.steps: dict[str, int] = {}

    def diff(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        assert a.shape == b.shape, (name, a.shape, b.shape)
        d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        self.max_diff[name] = max(self.max_diff.get(name, 0.0), d)
        self.steps[name] = self.steps.get(name, 0) + 1

    def same(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        assert a.shape == b.shape, (name, a.shape, b.shape)
        count = self.equal.setdefault(name, [0, 0])
        count[0] += int((a == b).sum())
        count[1] += a.numel()
        self.steps[name] = self.steps.get(name, 0) + 1


def class_probs(num_classes: int, gamma: float) -> torch.Tensor:
    """Long-tailed class frequencies ``gamma ** (-k / (K - 1))``, normalised."""
    k = torch.arange(num_classes, dtype=torch.float64)
    p = gamma ** (-k / max(num_classes - 1, 1))
    return (p / p.sum()).float()


def run_setting(s: Setting, official, seed: int) -> Stats:
    OfficialDASO, DASOModel, DistributionLogger = official
    gen = torch.Generator().manual_seed(seed)
    prior = class_probs(s.num_classes, s.gamma)
    means = F.normalize(torch.randn(s.num_classes, s.feat_dim, generator=gen), dim=-1) * 2.0
    parts = {"model_cls": DASOModel, "logger_cls": DistributionLogger,
             "ema": _EMAStub(s.feat_dim, gen), "class_count": prior * 1000}
    host = OfficialDASO(official_cfg(s, parts))
    model = host.model
    with torch.no_grad():  # a linear classifier biased towards the head classes
        model.classifier.classifier.weight.copy_(3.0 * means)
        model.classifier.classifier.bias.copy_(prior.log())
    for p in model.parameters():
        p.requires_grad_(False)

    ours = DASO(s.num_classes, s.feat_dim, queue_size=s.queue_size,
                proto_temperature=s.proto_temperature, dist_temperature=s.dist_temperature,
                warmup_iters=s.warmup, dist_window=s.window, align_weight=1.0)
    capture = _LocalsCapture(DASOModel.forward_train.__code__)
    stats = Stats()
    labeled_prior = prior.clone()
    for step in range(s.steps):
        if step % 100 == 0:
            print(f"{s.name}: step {step}/{s.steps}", file=sys.stderr, flush=True)
        lp = labeled_prior.clone()
        if step < s.late_class_until:
            lp[-1] = 0.0
        y_l = torch.multinomial(lp, s.labeled_batch, replacement=True, generator=gen)
        y_u = torch.multinomial(prior, s.unlabeled_batch, replacement=True, generator=gen)
        x_l = means[y_l] + 0.6 * torch.randn(s.labeled_batch, s.feat_dim, generator=gen)
        x_w = means[y_u] + 0.6 * torch.randn(s.unlabeled_batch, s.feat_dim, generator=gen)
        x_s = x_w + 0.8 * torch.randn(s.unlabeled_batch, s.feat_dim, generator=gen)
        x_s_leaf = x_s.clone().requires_grad_(True)

        # ---- official step
        host.iter = step
        host._l_iter = iter([(x_l, y_l, None)])
        host._ul_iter = iter([((x_w, x_s_leaf), y_u, None)])
        with capture:
            host.run_step()
        off = capture.values
        off_grad = x_s_leaf.grad

        # ---- imbssl step, in the order the algorithms call it (imbssl/algorithms/fixmatch.py)
        ours.update_labeled(parts["ema"](x_l, return_features=True), y_l)
        probs = model.classifier(x_w).softmax(dim=-1)
        v = ours.blend_weights()
        q = ours.semantic_probs(x_w)
        refined = ours.refine(probs, x_w, step)
        conf, final = refined.max(dim=-1)
        mask = (conf >= s.threshold).float()
        ours.observe(final)
        feats_s = x_s.clone().requires_grad_(True)
        align, _ = ours.extra_loss(x_w, feats_s, step)

        # ---- compare
        queue_len = torch.tensor([len(model.queue._bank[c]) for c in range(s.num_classes)])
        stats.diff("queue lengths (per class)", queue_len, ours.queue_len)
        stats.diff("prototypes", model.queue.prototypes, ours.prototypes)
        stats.diff("pseudo-label probabilities (blended p')", off["p"], refined)
        stats.diff("confidence max p'", off["confidence"], conf)
        stats.same("final pseudo-label argmax p' (equal)", off["pred_class"], final)
        stats.same("confidence mask (equal)", off["loss_weight"], mask)
        if step >= s.window:  # the official m_hat is 0/0 before its first refresh
            stats.diff("m_hat (after the step)", host.dist_logger.get_pl_dist(), ours.m_hat)
        stats.same("context: mask = 1 (official)", off["loss_weight"], torch.ones_like(mask))
        if ours.active(step):
            stats.same("context: final = linear pseudo-label after warm-up (official)",
                       off["pred_class"], probs.argmax(dim=-1))
            stats.diff("semantic probabilities q (weak view)", off["soft_target"], q)
            stats.same("semantic pseudo-label argmax q (equal)", off["assignment"],
                       ours.last_semantic)
            stats.diff("blend weights v", off["current_pl_dist"], v)
            stats.diff("alignment loss", off["loss_assign"], align.detach())
            grad = torch.autograd.grad(align, feats_s)[0]
            stats.diff("alignment loss gradient (strong features)", off_grad, grad)
        else:
            assert align is None and "soft_target" not in off, "warm-up differs"
    return stats


# ---------------------------------------------------------------------- report
def digest(official: Path) -> str:
    h = hashlib.sha256()
    for f in OFFICIAL_FILES:
        h.update((official / f).read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(results: dict[str, Stats], args, official: Path) -> str:
    names = list(results)
    lines = [
        "# Parity: official DASO code vs imbssl.pseudo.daso.DASO",
        "",
        f"Produced by `python analysis/parity_official_daso.py --official <checkout> "
        f"--seed {args.seed} --out <this file>`; imbssl commit {git_commit()}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, float32 on the CPU.",
        f"Official files run ({', '.join(f'`{f}`' for f in OFFICIAL_FILES)}): sha256 of "
        f"their concatenation {digest(official)}.",
        "",
        "Both sides get the same random labeled features (EMA features for the queue), weak "
        "and strong unlabeled features and the same linear classifier every step. Values: "
        "the largest absolute difference over all steps compared, or, for labels and masks, "
        "the fraction of equal entries. The two `context` rows are not differences: they show "
        "how often the official mask is on and how often blending changed the linear label, "
        "so that the equalities above are not trivial.",
        "",
    ]
    for name in names:
        s = next(x for x in SETTINGS if x.name == name)
        lines.append(f"- **{name}**: K={s.num_classes}, D={s.feat_dim}, queue {s.queue_size}, "
                     f"T_proto {s.proto_temperature}, T_dist {s.dist_temperature}, labeled "
                     f"batch {s.labeled_batch}, unlabeled {s.unlabeled_batch}, {s.steps} "
                     f"steps, warm-up {s.warmup}, m_hat window {s.window}, gamma {s.gamma:g}"
                     + (f", class {s.num_classes - 1} absent from labeled batches before "
                        f"step {s.late_class_until}" if s.late_class_until else ""))
    lines += ["", "| quantity | " + " | ".join(names) + " |",
              "| --- |" + " --- |" * len(names)]
    keys = list(dict.fromkeys(k for st in results.values()
                              for k in (*st.max_diff, *st.equal)))
    for key in keys:
        cells = []
        for name in names:
            st = results[name]
            if key in st.max_diff:
                cells.append(f"{st.max_diff[key]:.3g} ({st.steps[key]} steps)")
            elif key in st.equal:
                eq, total = st.equal[key]
                cells.append(f"{eq}/{total} = {eq / total:.6f}")
            else:
                cells.append("-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Semantic probabilities, blend weights and the alignment loss are compared "
              "only after warm-up: the official step does not compute them before. m_hat is "
              "compared from the first refresh on (the official distribution is all-zero "
              "before it, imbssl's uniform; neither is used during warm-up).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True,
                        help="checkout of github.com/ytaek-oh/daso")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the table here (Markdown)")
    args = parser.parse_args(argv)
    official_path = args.official.resolve()
    official = import_official(official_path)
    torch.set_num_threads(1)  # small tensors: threads only add overhead
    results = {s.name: run_setting(s, official, args.seed) for s in SETTINGS}
    text = render(results, args, official_path)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
