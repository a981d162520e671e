"""The one training loop. It owns precision, optimizer, schedule, EMA, evaluation, logging and
checkpoints; what a step computes is the algorithm's business (``algo.step(batch, state)``).

Host syncs happen only at log, evaluation and checkpoint intervals: per-step scalars, the
first step at which each loss term became non-finite and pseudo-label confusion matrices
accumulate on the device.

Life cycle: ``Trainer(cfg)`` checks every config value and builds data, network and
algorithm without writing anything; ``prepare()`` checks the run folder and, with
``resume=true``, loads the last checkpoint (still writing nothing); ``run()`` writes the
folder and trains. The CLI calls the first two before Hydra creates its files, so a bad
input never touches an existing run folder.

Exact resume: a checkpoint holds everything that shapes the rest of the run (weights, EMA,
optimizer, grad scaler, every random generator, the batch streams' positions, the
algorithm's buffers including non-persistent ones, the pseudo-label tracker, pending log
accumulators, evaluation history); on resume the rows logged after the checkpoint are
dropped from ``metrics.jsonl`` and ``per_class.csv``, so a resumed run's files equal an
uninterrupted run's.

Where long runs die: SIGTERM/SIGUSR1/SIGUSR2 finish the step, checkpoint it and raise
``Preempted`` (summary ``status: preempted``, CLI exit 75; several processes agree on the
stop at the next log/eval/checkpoint step, so no other step pays a collective for it);
``resume=true`` skips a damaged newest checkpoint (named, renamed ``*.damaged``) for the
newest good one; a full disk is a one-line ``DiskFullError`` (exit 74) that keeps the
previous checkpoint; a failed evaluation or report is a warning and a ``missing`` entry in
summary.json, never the end of training.

Several processes (``torchrun``): see :mod:`imbssl.engine.distributed`.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.data import DataError, DatasetConfig, build_data
from imbssl.data.device_loader import TensorSet, make_stream
from imbssl.diagnostics.logfile import RunLog
from imbssl.diagnostics.loggers import check_logger, open_run_log
from imbssl.diagnostics.metrics import (
    confusion_to_metrics,
    final_accuracy_lines,
    format_per_class_table,
    median_of_last,
    per_class_rows,
)
from imbssl.diagnostics.tracker import PseudoLabelTracker, refiner_rows
from imbssl.engine import distributed as ddp
from imbssl.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_loadable,
    remove_partial,
    save_checkpoint,
)
from imbssl.engine.config import OptimConfig, TrainerConfig, typed
from imbssl.engine.evaluate import confusion_matrix
from imbssl.engine.rng import rng_state, seed_everything, set_rng_state
from imbssl.engine.run_dir import (
    check_run_dir,
    environment,
    git_commit,
    prepare_run_dir,
    truncate_logs,
    write_meta,
)
from imbssl.engine.validation import check_all
from imbssl.errors import UserError
from imbssl.fileio import DiskFullError, disk_full, is_disk_full
from imbssl.models import EMA, ModelConfig, build_model
from imbssl.pseudo import build_refiner, refiner_config

CHECKPOINT_FORMAT = 2
NEVER = 2**62  # "no non-finite value yet" in the first-bad-step accumulators


# SLURM's kill (SIGTERM), a `sbatch --signal` warning (SIGUSR1) and submitit's warning
# (SIGUSR2: `--signal=USR2@signal_delay_s`, and on preemption; submitit/core/job_environment.py)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM, SIGUSR1 or SIGUSR2 arrived: the step was finished and checkpointed;
    resume=true continues exactly. ``signum``: the signal (None: another process's)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def signals_as_flag(flag: dict):
    """While training, the preemption signals only note themselves in ``flag["signal"]`` (read
    between steps); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield flag  # handlers can only be set from the main thread
        return
    previous = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}

    def note(signum, _frame) -> None:
        flag["signal"] = signum

    for s in PREEMPTION_SIGNALS:
        signal.signal(s, note)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str):
        raise UserError(f"device={name!r} is not a device name; use auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but CUDA is not available; use device=cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and ddp.is_distributed():  # one GPU per process
        device = torch.device("cuda", ddp.local_rank())
    return device


def lr_factor(step: int, total: int, schedule: str, warmup: int,
              milestones=(), gamma: float = 1.0) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":  # FixMatch: cos(7 pi k / (16 K))
        return math.cos(7.0 * math.pi * step / (16.0 * total))
    if schedule == "multistep":  # official WarmupMultiStepLR: gamma ** bisect_right(steps, k)
        return gamma ** sum(step >= m for m in milestones)
    return 1.0


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """SGD (Nesterov); weight decay on every parameter (``decay_scope=all``, official DASO) or
    not on biases and batch-norm parameters (``no_bias_bn``, FixMatch codebases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = cfg.decay_scope == "no_bias_bn" and (p.ndim <= 1 or "bn" in name)
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           **fast)


@dataclass
class _Accumulator:
    """Per-step scalars of one set of keys, summed on the device since the last flush."""

    total: Tensor  # (n_keys,) float32 sums
    count: int  # steps added
    first_bad: Tensor  # (n_keys,) int64: first step (1-based) with a non-finite value, or NEVER


class Trainer:
    """Builds data, network, EMA, algorithm and optimizer from a config and runs the loop."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.resume, self.overwrite = bool(cfg.get("resume", False)), bool(
            cfg.get("overwrite", False))
        self.tcfg: TrainerConfig = typed(cfg, "trainer", TrainerConfig)
        self.ocfg: OptimConfig = typed(cfg, "optim", OptimConfig)
        self.mcfg: ModelConfig = typed(cfg, "model", ModelConfig)
        self.dcfg: DatasetConfig = typed(cfg, "dataset", DatasetConfig)
        algo_cls = get_algorithm(str(cfg.algorithm.name))
        algo_cfg = typed(cfg, "algorithm", algo_cls.Config)
        pseudo_cfg = self._pseudo_config(cfg)
        check_all(cfg, self.tcfg, self.ocfg, self.mcfg, self.dcfg, algo_cfg, pseudo_cfg)
        self.world, self.rank = ddp.world_size(), ddp.rank()
        self.is_main = self.rank == 0
        uratio = int(algo_cfg.uratio)
        if self.tcfg.batch_size % self.world:
            raise UserError(f"trainer.batch_size={self.tcfg.batch_size} must be divisible by "
                            f"the number of processes ({self.world}); every process trains on "
                            "an equal share of the global batch")
        self.device = resolve_device(cfg.device)
        if self.tcfg.sync_bn and self.world > 1 and self.device.type != "cuda":
            raise UserError("trainer.sync_bn=true needs CUDA (SyncBatchNorm does not run on the "
                            "CPU); use model.norm=group with small_cnn or trainer.sync_bn=false")
        if self.tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)

        try:
            self.data = build_data(self.dcfg, self.device)
        except DataError as exc:
            if "were requested" not in str(exc):
                raise
            raise DataError(f"{exc}; lower dataset.n1 / dataset.m1 (or raise dataset.gamma_l "
                            "/ dataset.gamma_u) to fit the data") from None
        self._build_network(algo_cls, algo_cfg, pseudo_cfg)
        self._build_streams(uratio, int(cfg.seed))
        self.precision = self._precision()
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.precision == torch.float16)
        self.tracker = PseudoLabelTracker(self.data.num_classes, self.device)
        self.log: RunLog | None = None  # created by run(): nothing is written before
        self.step_count = 0
        self.eval_history: dict[str, list[float]] = {}
        self._acc: dict[tuple[str, ...], _Accumulator] = {}
        self._last_test: dict | None = None
        self._last_eval_step = -1
        self._resumed_from: Path | None = None
        self._resumed_at = 0
        self._damaged: list[tuple[Path, str]] = []  # newer checkpoints that failed to load
        self._signal: dict = {"signal": None}  # set by a PREEMPTION_SIGNALS during run()
        self._saved_step = -1  # the step of the last checkpoint written or loaded
        self._missing: list[str] = []  # evaluations / report parts that failed
        self._prepared = False
        self._tb = None
        self._start_rng = rng_state()  # run() starts from here whatever ran in between

    def _build_network(self, algo_cls, algo_cfg, pseudo_cfg) -> None:
        """Model (+ the algorithm's heads), EMA copy, algorithm with its refiner, optimizer."""
        k = self.data.num_classes
        model = self._new_model(algo_cls, algo_cfg)
        if self.tcfg.sync_bn and self.world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if self.mcfg.channels_last:  # faster convolutions on CUDA and on the CPU (oneDNN)
            self.model.to(memory_format=torch.channels_last)
        ddp.broadcast_module(self.model)  # replicas start equal (they are seeded alike anyway)
        self.ema = EMA(self.model, self.mcfg.ema_decay, warmup=self.mcfg.ema_warmup,
                       buffers=self.mcfg.ema_buffers, train_mode=self.mcfg.ema_train_mode)
        try:
            refiner = build_refiner(pseudo_cfg, k, self.model.feat_dim,
                                    num_unlabeled=len(self.data.unlabeled.labels),
                                    labeled_counts=self.data.labeled_counts,
                                    has_validation=self.data.valid is not None)
            self.algo = algo_cls(algo_cfg, k, self.model.feat_dim, self.data.labeled.labels,
                                 refiner=refiner).to(self.device)
        except UserError:
            raise
        except ValueError as exc:  # constructors validate their config values
            raise UserError(f"algorithm={algo_cfg.name} pseudo="
                            f"{getattr(pseudo_cfg, 'name', 'none')}: {exc}") from None
        if self.algo.needs_validation and self.data.valid is None:
            raise UserError(f"algorithm={algo_cfg.name} needs a validation set; set "
                            "dataset.num_valid_per_class")
        if self.algo.init_from:
            self._load_init_weights(self.algo.init_from)
        self.algo.configure_network(self.model)
        self.optimizer = build_optimizer(self.model, self.ocfg, self.device)
        self.grad_sync = ddp.GradientAllReduce(self.model)
        self.forward_model = (torch.compile(self.model) if self.tcfg.compile or self.mcfg.compile
                              else self.model)

    def _new_model(self, algo_cls=None, algo_cfg=None):
        """A freshly initialised network with the algorithm's heads (global RNG), on the CPU."""
        algo_cls = algo_cls or type(self.algo)
        algo_cfg = algo_cfg if algo_cfg is not None else self.algo.cfg
        model = build_model(self.mcfg.name, self.data.num_classes, self.data.image_shape[0],
                            norm=self.mcfg.norm, bn_momentum=self.mcfg.bn_momentum,
                            wrn_residual=self.mcfg.wrn_residual)
        model.heads.update(algo_cls.make_heads(algo_cfg, model.feat_dim, self.data.num_classes))
        return model

    def _load_init_weights(self, source: str) -> None:
        """The network and EMA weights of ``source`` (a checkpoint file, or a run folder:
        its newest good checkpoint), as the algorithm's ``load_init_weights`` takes them."""
        path = Path(source).expanduser()
        if path.is_dir():
            ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            if latest_checkpoint(ckpt_dir) is None:
                raise UserError(f"init_from={source}: no checkpoint in {ckpt_dir}; pass a run "
                                "folder or RUN/checkpoints/ckpt_<step>.pt")
            path, state, _ = newest_loadable(ckpt_dir, "cpu")
        elif path.is_file():
            state = load_checkpoint(path)
        else:
            raise UserError(f"init_from={source} does not exist; pass a run folder or "
                            "RUN/checkpoints/ckpt_<step>.pt")
        check_compatible(state, self.data.num_classes, self.mcfg.name, None, self.mcfg.norm)
        try:
            self.algo.load_init_weights(self.model, self.ema.model, state)
        except (RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"init_from={path}: its weights do not fit the configured network "
                            f"({first[:200]})") from None

    def _build_streams(self, uratio: int, seed: int) -> None:
        """Seeded labeled/unlabeled batch streams and the augmentation generator. Every process
        gets the same ones: each draws the global batch and keeps its share
        (see imbssl/engine/distributed.py)."""
        bs = self.tcfg.batch_size
        self.initial_labeled = self.data.labeled
        self.labeled_added: dict[str, Tensor] | None = None  # a LabeledSetUpdate's additions
        self.labeled_stream = make_stream(self.data.labeled, bs, seed * 1000 + 1, self.device,
                                          self.algo.labeled_sampling)
        self.unlabeled_stream = make_stream(self.data.unlabeled, bs * uratio, seed * 1000 + 2,
                                            self.device)
        self.aug_gen = torch.Generator(device=self.device)
        self.aug_gen.manual_seed(seed * 1000 + 3)

    # ----------------------------------------------------------------- setup helpers
    @staticmethod
    def _pseudo_config(cfg: DictConfig):
        node = cfg.get("pseudo")
        name = "none" if node is None else str(node.get("name", "none"))
        schema = refiner_config(name)
        return schema() if node is None else typed(cfg, "pseudo", schema)

    def _precision(self) -> torch.dtype:
        name = self.tcfg.precision
        if name == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

    def autocast(self):
        if self.precision == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def _prepare(self, x: Tensor) -> Tensor:
        if self.mcfg.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ----------------------------------------------------------------- the loop
    def next_batch(self) -> tuple[Batch, Tensor | None]:
        """Sample and augment one step's batch; returns it and the unlabeled true labels.

        The global batch is drawn and augmented; this process keeps its share (all of it
        for one process)."""
        aug, gen = self.data.augmenter, self.aug_gen
        x, y, idx = self.labeled_stream.next()
        lb = ddp.even_shard(len(x))
        batch = Batch(x_lb=self._prepare(aug.weak(x, gen)[lb]), y_lb=y[lb], idx_lb=idx[lb])
        y_ulb = None
        if self.algo.unlabeled_views:
            xu, y_ulb, idx_u = self.unlabeled_stream.next()
            views = [aug.view(v, xu, gen) for v in self.algo.unlabeled_views]
            ub = ddp.even_shard(len(xu))
            batch.x_ulb = [self._prepare(v[ub]) for v in views]
            batch.idx_ulb, y_ulb = idx_u[ub], y_ulb[ub]
        return batch, y_ulb

    def train_step(self) -> None:
        step = self.step_count
        phase_step, phase_total = self.algo.phase(step, self.tcfg.iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = self.ocfg.lr * lr_factor(phase_step, phase_total,
                                                   self.ocfg.schedule, self.ocfg.warmup_iters,
                                                   self.ocfg.milestones, self.ocfg.gamma)
        batch, y_ulb = self.next_batch()
        state = StepState(step, self.tcfg.iterations, self.forward_model, self.ema.model)
        with self.autocast():
            loss, logs = self.algo.step(batch, state)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.grad_sync()  # mean gradient over processes (no-op for one)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.world > 1 and not self.tcfg.sync_bn:
            ddp.broadcast_buffers(self.model)
        self.ema.update(self.model, phase_step)
        if self.world > 1 and self.ema.model.training:  # its own forward moved its BN stats
            ddp.broadcast_buffers(self.ema.model)
        self._accumulate(loss, logs, y_ulb)
        self.step_count += 1

    def _accumulate(self, loss: Tensor, logs: dict[str, Tensor], y_ulb: Tensor | None) -> None:
        """Add this step's scalars and note, per key, the first step with a non-finite
        value; a few tiny device ops, no host sync."""
        keys = ("loss/total", *[k for k, v in logs.items() if v.ndim == 0])
        values = torch.stack([loss.detach().float()]
                             + [logs[k].detach().float() for k in keys[1:]])
        bad_at = torch.where(torch.isfinite(values), NEVER, self.step_count + 1)
        acc = self._acc.get(keys)
        if acc is None:
            self._acc[keys] = _Accumulator(values, 1, bad_at)
        else:
            acc.total.add_(values)
            acc.count += 1
            torch.minimum(acc.first_bad, bad_at, out=acc.first_bad)
        if y_ulb is not None:
            self.tracker.update({k: v for k, v in logs.items() if k.startswith("pseudo/")}, y_ulb)

    def flush_scalars(self) -> dict[str, float]:
        """Average the accumulated scalars (one host transfer; with several processes, one
        all-reduce each for sums and first non-finite steps); raise ``NonFiniteLossError``
        naming the first step and loss term that became NaN or infinite."""
        if not self._acc:
            return {}
        groups = list(self._acc.items())
        self._acc = {}
        total = ddp.all_reduce_mean(torch.cat([a.total for _, a in groups]))
        first_bad = ddp.all_reduce_min(torch.cat([a.first_bad for _, a in groups]))
        host = torch.cat([total.double(), first_bad.double()]).tolist()
        n = len(host) // 2
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bad: dict[str, int] = {}
        i = 0
        for keys, acc in groups:
            for key in keys:
                sums[key] = sums.get(key, 0.0) + host[i]
                counts[key] = counts.get(key, 0) + acc.count
                if host[n + i] < NEVER:
                    bad[key] = min(bad.get(key, NEVER), int(host[n + i]))
                i += 1
        bad = {k: s for k, s in bad.items() if k.startswith("loss/")}
        if bad:
            raise NonFiniteLossError(self._non_finite_message(bad))
        return {k: sums[k] / counts[k] for k in sums}

    def _non_finite_message(self, bad: dict[str, int]) -> str:
        terms = {k: s for k, s in bad.items() if k != "loss/total"} or bad
        first = min(terms.values())
        named = sorted(k for k, s in terms.items() if s == first)
        later = [f"{k} from step {s}" for k, s in sorted(terms.items(), key=lambda kv: kv[1])
                 if s != first]
        found = list_checkpoints(self.run_dir / "checkpoints")
        kept = (f"the last good checkpoint {found[-1][1].name} (step {found[-1][0]}) is kept"
                if found else "no checkpoint had been written")
        return (f"non-finite loss (NaN or inf): {', '.join(named)} at step {first}"
                + (f" (then {', '.join(later)})" if later else "")
                + f"; training stopped at step {self.step_count} and {kept}; lower optim.lr, "
                "use trainer.precision=fp32 or check the data")

    # ----------------------------------------------------------------- run
    def prepare(self) -> None:
        """Check the run folder and, with ``resume=true``, load its last checkpoint. Writes
        nothing, so a failure leaves an existing run folder untouched."""
        if self._prepared:
            return
        check_run_dir(self.run_dir, self.resume, self.overwrite)
        check_logger(self.cfg)  # logger=wandb/mlflow: the package is there, before any write
        if self.resume:
            self.load_latest()
        ddp.barrier()  # every process has checked the folder before process 0 writes to it
        self._prepared = True

    def _start(self) -> None:
        """The first writes: clear (overwrite=true) or truncate (resume=true) the folder."""
        if self.is_main:
            if self.resume:
                remove_partial(self.run_dir / "checkpoints")
                for bad, _ in self._damaged:  # kept for inspection, out of every listing
                    bad.replace(bad.with_name(bad.name + ".damaged"))
                truncate_logs(self.run_dir, self.step_count)
            else:
                prepare_run_dir(self.run_dir, False, self.overwrite)
                self._write_config()
            self.log = open_run_log(self.run_dir, self.cfg)  # + wandb/mlflow (logger=...)
        ddp.barrier()
        if not self.resume:
            set_rng_state(self._start_rng)

    def run(self) -> dict:
        """Train to ``trainer.iterations`` (resuming if asked) and return the summary."""
        self.prepare()
        self._start()
        if self._resumed_from is not None and self.is_main:
            print(f"resumed from {self._resumed_from} at step {self.step_count}",
                  file=sys.stderr)
        total = self.tcfg.iterations
        self._write_summary(self.summary("running"))
        progress = self._progress(total)
        try:
            with signals_as_flag(self._signal):
                while self.step_count < total:
                    self.train_step()
                    progress.update(1)
                    self._periodic(progress)
                    if self.step_count < total and self._preemption_requested():
                        self._preempt()
            if self._last_eval_step != self.step_count:
                self._evaluate_or_note()
            if self._last_test is None:  # resumed after the final evaluation: recompute it
                self._guarded("final test evaluation", lambda: setattr(
                    self, "_last_test", self._measure("test", self.data.test)))
        except NonFiniteLossError as exc:
            self._write_summary(self.summary("failed", error=str(exc)))
            raise
        except Preempted:
            self._write_summary(self.summary("preempted"))
            raise
        except BaseException as exc:
            full = self._as_disk_full(exc)
            status = self.summary("failed", error=str(full)) if full else self.summary("stopped")
            with contextlib.suppress(OSError, DiskFullError):  # the disk may still be full
                self._write_summary(status)
            if full is not None and full is not exc:
                raise full from exc
            raise
        finally:
            progress.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        summary = self.summary("finished")
        self._write_summary(summary)
        if self.is_main:
            if self._last_test is not None:
                self._print_final()
            if self.tcfg.report:
                self._guarded("report", self.write_report, fallback=self._write_plain_report)
                if self._missing:
                    summary = self.summary("finished")
                    self._write_summary(summary)
        return summary

    def _as_disk_full(self, exc: BaseException) -> DiskFullError | None:
        """``exc`` as the one-line full-disk error naming the file (None: another error)."""
        if isinstance(exc, DiskFullError) or not is_disk_full(exc):
            return exc if isinstance(exc, DiskFullError) else None
        return disk_full(exc.filename or f"a log file in {self.run_dir}", exc)

    def _preemption_requested(self) -> bool:
        """A preemption signal reached this process. With several processes: whether one
        reached any process, asked only at flush steps (log/eval/checkpoint: one tiny
        all-reduce where the host syncs anyway), so all stop after the same step and the
        other steps stay free of host syncs."""
        asked = self._signal["signal"] is not None
        if self.world == 1:
            return asked
        return self._flush_step() and ddp.any_process(asked, self.device)

    def _preempt(self) -> None:
        """Checkpoint the finished step (unless it just was) and raise ``Preempted``."""
        if self._saved_step != self.step_count:
            self.save()
        signum = self._signal["signal"]
        name = signal.Signals(signum).name if signum is not None else "a preemption signal"
        raise Preempted(f"{name} received: stopped after step {self.step_count} and "
                        f"checkpointed it in {self.run_dir / 'checkpoints'}; continue with "
                        "resume=true", signum)

    def _guarded(self, what: str, action, fallback=None) -> None:
        """Run ``action``; an evaluation or report failure is logged (one line on stderr, and
        ``missing`` in summary.json) instead of ending the run. Full disks, non-finite losses
        and preemption still stop it."""
        try:
            action()
        except (NonFiniteLossError, Preempted, DiskFullError):
            raise
        except Exception as exc:  # noqa: BLE001 - diagnostics must not kill training
            if is_disk_full(exc):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            note = f"{what} at step {self.step_count} failed ({type(exc).__name__}: {first})"
            self._missing.append(note)
            if self.is_main:
                print(f"imbssl: warning: {note}; training goes on", file=sys.stderr)
            if fallback is not None:
                fallback(note)

    def _evaluate_or_note(self) -> None:
        self._guarded("evaluation", self.evaluate)

    def _write_plain_report(self, note: str) -> None:
        """The report without figures, saying what is missing (or, if even that fails, a
        Markdown file that only says so)."""
        from imbssl.diagnostics import report as rep
        from imbssl.diagnostics.logfile import read_run
        from imbssl.diagnostics.plots import run_labels

        out = self.run_dir / "report"
        missing = rep.Block("p", f"Missing from this report: {note}. Rebuild it with "
                                 f"`imbssl report {self.run_dir}`.")
        try:
            runs = [read_run(self.run_dir)]
            blocks = [missing, *rep.build_blocks(runs, run_labels(runs), [])]
            out.with_name("report.html").write_text(rep.render_html(blocks), encoding="utf-8")
            out.with_name("report.md").write_text(rep.render_markdown(blocks, self.run_dir),
                                                  encoding="utf-8")
        except Exception as exc:  # noqa: BLE001 - the note alone, then
            if is_disk_full(exc):
                raise
            out.with_name("report.md").write_text(f"# imbssl report\n\n{missing.content}\n",
                                                  encoding="utf-8")

    def write_report(self) -> None:
        """Plots + HTML/Markdown report of this run (also: ``imbssl report RUN``)."""
        from imbssl.diagnostics.report import build_report

        html, md = build_report([self.run_dir], self.run_dir / "report")
        print(f"report: {html} (and {md.name})")

    def _periodic(self, progress) -> None:
        """Log, evaluate and checkpoint. Every checkpoint step is also a flush step, so no
        log accumulator is pending in a checkpoint, and a non-finite loss stops the run
        before the checkpoint is written."""
        step, t = self.step_count, self.tcfg
        at = lambda every: every > 0 and (step % every == 0 or step == t.iterations)  # noqa: E731
        if self._flush_step():
            scalars = self.flush_scalars()
            if scalars:
                row = {"step": step, "split": "train", "lr": self.optimizer.param_groups[0]["lr"],
                       **scalars}
                self._append_metrics(row)
                progress.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in scalars.items()
                                      if k.startswith("loss/")}, refresh=False)
        if at(t.eval_interval):
            self._evaluate_or_note()
        if self.algo.labeled_update_due(step, t.iterations):  # after evaluating, as CReST
            self.update_labeled_set()
        if at(t.checkpoint_interval):
            self.save()

    # ----------------------------------------------------------------- labeled-set updates
    @torch.no_grad()
    def unlabeled_probs(self) -> Tensor:
        """(N_u, K) softmax of the EMA model's predictions (``eval_predictor``) on the
        unaugmented unlabeled set (eval mode; every process computes all of it, so all agree)."""
        model, images = self.ema.model, self.data.unlabeled.images
        predict = self.algo.eval_predictor(model)
        was_training = model.training
        model.eval()
        out = []
        for start in range(0, len(images), self.tcfg.eval_batch_size):
            x = self._prepare(self.data.augmenter.normalize(
                images[start:start + self.tcfg.eval_batch_size]))
            with self.autocast():
                logits = predict(model(x))
            out.append(torch.softmax(logits.float(), dim=-1))
        model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def soft_predictions(self, split: str) -> tuple[Tensor, Tensor] | None:
        """(softmax, labels) of the evaluated network (``algo.eval_network``, eval mode,
        ``eval_predictor``) on the unaugmented ``split`` ("test", "valid", "unlabeled");
        None when the run has no such split. Every process computes all of it."""
        tset = {"test": self.data.test, "valid": self.data.valid,
                "unlabeled": self.data.unlabeled}[split]
        if tset is None:
            return None
        model = self.algo.eval_network(self.model, self.ema.model)
        predict, was_training = self.algo.eval_predictor(model), model.training
        model.eval()
        out = []
        for start in range(0, len(tset.images), self.tcfg.eval_batch_size):
            x = self._prepare(self.data.augmenter.normalize(
                tset.images[start:start + self.tcfg.eval_batch_size]))
            with self.autocast():
                out.append(torch.softmax(predict(model(x)).float(), dim=-1))
        model.train(was_training)
        return torch.cat(out), tset.labels

    def update_labeled_set(self) -> None:
        """Ask the algorithm for its new labeled set, switch the labeled stream to it (and
        restart network, EMA and optimizer if asked); log the additions per class."""
        update = self.algo.update_labeled_set(self.unlabeled_probs(), self.step_count,
                                              self.tcfg.iterations)
        self._set_labeled_added(update.indices, update.labels)
        stream = self.labeled_stream
        seed = int(torch.randint(2**62, (1,), generator=stream.generator))
        self.labeled_stream = make_stream(self.data.labeled, stream.batch_size, seed,
                                          self.device, self.algo.labeled_sampling)
        if update.restart:
            self._restart_network()
        self._log_labeled_update(update)

    def _set_labeled_added(self, indices: Tensor, labels: Tensor) -> None:
        """``data.labeled`` := the initial labeled set + unlabeled ``indices`` as ``labels``."""
        indices = indices.long().to(self.device)
        labels = labels.long().to(self.device)
        self.labeled_added = {"indices": indices.cpu(), "labels": labels.cpu()}
        init, unl = self.initial_labeled, self.data.unlabeled
        self.data.labeled = TensorSet(torch.cat([init.images, unl.images[indices]]),
                                      torch.cat([init.labels, labels]))

    def _restart_network(self) -> None:
        """Fresh weights (global RNG), EMA = the fresh network, empty optimizer state."""
        fresh = self._new_model()
        self.model.load_state_dict(fresh.state_dict())
        self.ema.model.load_state_dict(self.model.state_dict())
        self.optimizer.state.clear()
        self.algo.configure_network(self.model)

    def _log_labeled_update(self, update) -> None:
        """metrics.jsonl: how many were added; per_class.csv (source ``labeled_set``): the
        added images' pseudo-labels against their true classes; labeled_added_<step>.npy:
        that K x K matrix (rows: true class, columns: pseudo-label)."""
        if self.log is None:
            return
        k = self.data.num_classes
        true = self.data.unlabeled.labels[update.indices.to(self.device)].cpu()
        known = true >= 0  # STL-10's unlabeled images have no label
        conf = torch.bincount(true[known] * k + update.labels.cpu()[known],
                              minlength=k * k).view(k, k).numpy()
        self._append_metrics({"step": self.step_count, "split": "labeled_set",
                              "added": len(update.indices), "labeled": len(self.data.labeled),
                              "restart": int(update.restart)})
        self.log.append_per_class(per_class_rows(self.step_count, "labeled_set", "added", "all",
                                                 confusion_to_metrics(conf),
                                                 self.data.class_names))
        self.log.write_confusion(conf, f"labeled_added_{self.step_count:08d}.npy")

    def _flush_step(self) -> bool:
        """Whether this step logs, evaluates or checkpoints (and so syncs the host anyway)."""
        step, t = self.step_count, self.tcfg
        return any(every > 0 and (step % every == 0 or step == t.iterations)
                   for every in (t.log_interval, t.eval_interval, t.checkpoint_interval))

    # ----------------------------------------------------------------- evaluation
    def _measure(self, split: str, tset) -> dict:
        """The evaluated network (``algo.eval_network``: EMA by default) on ``tset``: each
        process counts its shard of the images, summed."""
        part = ddp.shard(len(tset.images))
        net = self.algo.eval_network(self.model, self.ema.model)
        conf = confusion_matrix(net, tset.images[part], tset.labels[part],
                                lambda x: self._prepare(self.data.augmenter.normalize(x)),
                                self.data.num_classes, self.tcfg.eval_batch_size,
                                self.autocast, predict=self.algo.eval_predictor(net))
        conf = ddp.all_reduce_sum(conf).cpu().numpy()
        metrics = confusion_to_metrics(conf)
        return {"step": self.step_count, "split": split, "top1": float(metrics["top1"]),
                "balanced_acc": float(metrics["balanced_acc"]), "metrics": metrics,
                "confusion": conf}

    def evaluate(self) -> dict:
        """EMA model on test (and validation) + pseudo-label diagnostics since the last call."""
        step, names = self.step_count, self.data.class_names
        results = {}
        splits = [("test", self.data.test)] + ([("valid", self.data.valid)]
                                              if self.data.valid is not None else [])
        for split, tset in splits:
            res = self._measure(split, tset)
            if split == "valid":  # e.g. DARP's estimate of the unlabeled distribution
                self.algo.observe_validation(torch.as_tensor(res["confusion"], device=self.device))
            row = {k: res[k] for k in ("step", "split", "top1", "balanced_acc")}
            self._append_metrics(row)
            if self.log is not None:
                self.log.append_per_class(per_class_rows(step, split, "prediction", "all",
                                                         res["metrics"], names))
                if split == "test":
                    self.log.write_confusion(res["confusion"])
            for key in ("top1", "balanced_acc"):
                self.eval_history.setdefault(f"{split}/{key}", []).append(row[key])
            results[split] = res
        pseudo_rows = self.tracker.flush(step, names)  # all processes: sums the matrices
        if pseudo_rows and self.log is not None:
            self.log.append_per_class(pseudo_rows)
            self._append_metrics({"step": step, "split": "pseudo", **self.tracker.last_summary})
        if self.log is not None:  # DASO's m_hat and blend weights v per class
            self.log.append_per_class(refiner_rows(step, self.algo.refiner, names))
        self.algo.observe_evaluation(self.soft_predictions)  # e.g. DARP's estimation run
        self._last_test = results["test"]
        self._last_eval_step = step
        self._write_summary(self.summary("running"))
        return results

    def summary(self, status: str, error: str | None = None) -> dict:
        n = self.tcfg.summary_last
        final = {k: v[-1] for k, v in self.eval_history.items()}
        med = {k: float(median_of_last(v, n)) for k, v in self.eval_history.items()}
        out = {"status": status, "step": self.step_count, "final": final,
               f"median_last{n}": med, "summary_last": n}
        if error:
            out["error"] = error
        if self._missing:  # evaluations or report parts that failed (training went on)
            out["missing"] = list(self._missing)
        return out

    def _print_final(self) -> None:
        metrics = self._last_test["metrics"]
        print(format_per_class_table(metrics, self.data.class_names, self.data.labeled_counts))
        history = self.eval_history.get("test/balanced_acc") or [metrics["balanced_acc"]]
        print(final_accuracy_lines(metrics, history, self.tcfg.summary_last))
        print(f"run folder: {self.run_dir}")

    # ----------------------------------------------------------------- logging helpers
    def _append_metrics(self, row: dict) -> None:
        if self.log is not None:
            self.log.append_metrics(row)
            self._tensorboard(row)

    def _write_summary(self, summary: dict) -> None:
        if self.log is not None:
            self.log.write_summary(summary)

    def _progress(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step_count, desc="train", dynamic_ncols=True,
                    disable=not (self.tcfg.progress and self.is_main), file=sys.stderr,
                    mininterval=1.0)

    def _tensorboard(self, row: dict) -> None:
        if not self.tcfg.tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tcfg.tensorboard = False
                return
            # a resumed run drops the events logged after its checkpoint, like metrics.jsonl
            purge = self._resumed_at + 1 if self._resumed_from is not None else None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        prefix = row["split"]
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, int | float):
                self._tb.add_scalar(f"{prefix}/{key}", value, row["step"])
        self._tb.flush()

    def _write_config(self) -> None:
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        write_meta(self.run_dir, {
            **git_commit(), **environment(self.device), "seed": int(self.cfg.seed),
            "class_names": self.data.class_names, "labeled_counts": self.data.labeled_counts,
            "unlabeled_counts": self.data.unlabeled_counts,
            "trainer": asdict(self.tcfg), "world_size": self.world, "command": sys.argv,
        })

    # ----------------------------------------------------------------- checkpoints
    def _algorithm_extra_buffers(self) -> dict[str, Tensor]:
        """The algorithm's non-persistent buffers (left out of ``state_dict``)."""
        out = {}
        for prefix, module in self.algo.named_modules():
            for name in getattr(module, "_non_persistent_buffers_set", ()):
                buf = module._buffers.get(name)
                if buf is not None:
                    out[f"{prefix}.{name}" if prefix else name] = buf
        return out

    def _tracker_state(self) -> dict:
        state = self.tracker.state_dict()
        if self.world > 1:  # the whole run's counts (each process holds its share)
            state["confusion"] = {
                k: ddp.all_reduce_sum(v.to(self.device)).cpu()
                for k, v in sorted(state["confusion"].items())}
        return state

    def state_dict(self) -> dict:
        """Everything that shapes the rest of the run (with several processes: a collective,
        every process must call it)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step_count,
            "num_classes": self.data.num_classes,
            "model_name": self.mcfg.name,
            "model_norm": self.mcfg.norm,
            "algorithm_name": str(self.cfg.algorithm.name),
            "world_size": self.world,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "algorithm": self.algo.state_dict(),
            "algorithm_buffers": dict(self._algorithm_extra_buffers()),
            "labeled_stream": self.labeled_stream.state_dict(),
            "labeled_added": self.labeled_added,
            "unlabeled_stream": self.unlabeled_stream.state_dict(),
            "aug_generator": self.aug_gen.get_state(),
            "rng": rng_state(),
            "tracker": self._tracker_state(),
            "eval_history": {k: list(v) for k, v in self.eval_history.items()},
            "last_eval_step": self._last_eval_step,
            "pending_scalars": self._pending_state(),
        }

    def _pending_state(self) -> list:
        """Log sums since the last flush (only a preemption checkpoint has any); with several
        processes their mean over processes, which every process loads back: the mean of
        (that + its own later sums) is what the uninterrupted flush computes."""
        return [[list(keys), ddp.all_reduce_mean(a.total), a.count,
                 ddp.all_reduce_min(a.first_bad)] for keys, a in self._acc.items()]

    def save(self) -> Path | None:
        """Checkpoint the current step (process 0 writes; every process must call it)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(ddp.all_reduce_min(finite.to(torch.int32)).item()):
            found = list_checkpoints(self.run_dir / "checkpoints")
            kept = (f"the last good checkpoint {found[-1][1].name} is kept" if found
                    else "no checkpoint had been written")
            raise NonFiniteLossError(
                f"the weights became non-finite (NaN or inf) by step {self.step_count} although "
                f"every logged loss was finite; no checkpoint was written and {kept}; lower "
                "optim.lr or use trainer.precision=fp32")
        state = self.state_dict()
        path = None
        if self.is_main:
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step_count,
                                   self.tcfg.keep_checkpoints)
        self._saved_step = self.step_count
        return path

    def load_state_dict(self, state: dict, source: str | Path = "the checkpoint") -> None:
        check_compatible(state, self.data.num_classes, self.mcfg.name,
                         str(self.cfg.algorithm.name), self.mcfg.norm)

        def part(name: str, load) -> None:
            try:
                load()
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"{source}: its {name} does not fit the configured run "
                                f"({first[:200]}); resume with the configuration it was "
                                f"trained with ({self.run_dir / 'config.yaml'})") from None

        part("model", lambda: self.model.load_state_dict(state["model"]))
        part("EMA model", lambda: self.ema.load_state_dict(state["ema"]))
        part("optimizer state", lambda: self.optimizer.load_state_dict(state["optimizer"]))
        part("grad scaler", lambda: self.scaler.load_state_dict(state["scaler"]))
        part("algorithm state", lambda: self.algo.load_state_dict(state["algorithm"]))
        part("algorithm buffers", lambda: self._load_extra_buffers(
            state.get("algorithm_buffers", {})))
        part("labeled-set additions", lambda: self._load_labeled_added(
            state.get("labeled_added")))
        part("labeled stream", lambda: self.labeled_stream.load_state_dict(
            state["labeled_stream"]))
        part("unlabeled stream", lambda: self.unlabeled_stream.load_state_dict(
            state["unlabeled_stream"]))
        part("augmentation generator", lambda: self.aug_gen.set_state(
            state["aug_generator"].cpu()))
        part("random generators", lambda: set_rng_state(state["rng"]))
        part("pseudo-label tracker", lambda: self.tracker.load_state_dict(state["tracker"]))
        if not self.is_main:  # the counts so far live on process 0 only
            self.tracker.reset()
        self.eval_history = {k: list(v) for k, v in state["eval_history"].items()}
        self._last_eval_step = int(state.get("last_eval_step", -1))
        self._acc = {}
        for keys, total, count, first_bad in state.get("pending_scalars", []):  # every process
            self._acc[tuple(keys)] = _Accumulator(total.to(self.device), int(count),
                                                  first_bad.to(self.device))
        self.step_count = self._saved_step = int(state["step"])

    def _load_labeled_added(self, added: dict | None) -> None:
        """Rebuild the labeled set (and a stream over it) from a checkpoint's additions."""
        if added is None:
            return
        self._set_labeled_added(added["indices"], added["labels"])
        self.labeled_stream = make_stream(self.data.labeled, self.labeled_stream.batch_size, 0,
                                          self.device, self.algo.labeled_sampling)

    def _load_extra_buffers(self, saved: dict) -> None:
        own = self._algorithm_extra_buffers()
        for name, value in saved.items():
            if name in own:
                own[name].copy_(value)

    def load_latest(self) -> None:
        """Load the newest good checkpoint; newer damaged ones are named on stderr and set
        aside (renamed ``*.damaged``) when the run starts writing."""
        ckpt_dir = self.run_dir / "checkpoints"
        if latest_checkpoint(ckpt_dir) is None:
            raise UserError(f"resume=true but {ckpt_dir} holds no checkpoint; run without "
                            "resume=true to start")
        path, state, self._damaged = newest_loadable(ckpt_dir, self.device)
        if self.is_main:
            for _bad, why in self._damaged:
                print(f"imbssl: warning: {why}; resuming from {path.name}", file=sys.stderr)
        self.load_state_dict(state, path)
        if self.step_count > self.tcfg.iterations:
            raise UserError(f"the checkpoint {path.name} is at step {self.step_count}, past "
                            f"trainer.iterations={self.tcfg.iterations}; raise "
                            "trainer.iterations")
        self._resumed_from, self._resumed_at = path, self.step_count


def check_compatible(state: dict, num_classes: int, model_name: str,
                     algorithm_name: str | None = None, norm: str | None = None) -> None:
    """A checkpoint from another number of classes, model or algorithm is a one-line error."""
    if int(state.get("num_classes", -1)) != num_classes:
        raise UserError(f"checkpoint has {state.get('num_classes')} classes but the dataset has "
                        f"{num_classes}; use a checkpoint of this dataset")
    if state.get("model_name") != model_name:
        raise UserError(f"checkpoint was trained with model={state.get('model_name')} but "
                        f"model={model_name} is configured; set model={state.get('model_name')}")
    saved_algo = state.get("algorithm_name")
    if algorithm_name is not None and saved_algo is not None and saved_algo != algorithm_name:
        raise UserError(f"checkpoint was trained with algorithm={saved_algo} but "
                        f"algorithm={algorithm_name} is configured; set algorithm={saved_algo}")
    saved_norm = state.get("model_norm", "batch")
    if norm is not None and saved_norm != norm:
        raise UserError(f"checkpoint was trained with model.norm={saved_norm} but "
                        f"model.norm={norm} is configured; set model.norm={saved_norm}")


def timed_run(cfg: DictConfig, trainer: Trainer | None = None) -> dict:
    """Train and print the wall time of the training part."""
    trainer = trainer if trainer is not None else Trainer(cfg)
    start = time.perf_counter()
    summary = trainer.run()
    if trainer.is_main:
        print(f"training time: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return summary
