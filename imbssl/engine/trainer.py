"""The one training loop. It owns precision, optimizer, schedule, EMA, evaluation, logging and
checkpoints; what a step computes is the algorithm's business (``algo.step(batch, state)``),
and the trainer never names a method: it calls the hooks of the algorithm contract
(``imbssl/algorithms/base.py``; all of them are described in docs/contributing.md).

This file holds the construction, the loop (``_train_loop``: the order of operations, top to
bottom) and one step (``train_step``). The rest of the trainer lives beside it, one concern
per file, as parts of the ``Trainer`` class:

* ``state.py``: run folder, checkpoints, exact resume (``RunState``);
* ``periodic.py``: the log rows, evaluation, summary, TensorBoard, reports (``PeriodicWork``);
* ``scalars.py``: per-step scalars summed on the device, flushed at log steps (``ScalarLog``);
* ``phases.py``: labeled-set updates (CReST) and init-from weights (cRT) (``DataPhases``);
* ``stops.py``: preemption, non-finite losses, full disks, failed diagnostics (``Stops``);
* ``setup.py``: the device, the optimizer and the learning-rate schedule.

Host syncs happen only at log, evaluation and checkpoint intervals: per-step scalars, the
first step at which each loss term became non-finite and pseudo-label confusion matrices
accumulate on the device.

Life cycle: ``Trainer(cfg)`` checks every config value and builds data, network and
algorithm without writing anything; ``prepare()`` checks the run folder and, with
``resume=true``, loads the last checkpoint (still writing nothing); ``run()`` writes the
folder and trains. The CLI calls the first two before Hydra creates its files, so a bad
input never touches an existing run folder.

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
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from imbssl.algorithms import Batch, StepState, algorithm_class, get_algorithm
from imbssl.data import DataError, DatasetConfig, build_data
from imbssl.data.device_loader import make_stream
from imbssl.diagnostics.logfile import RunLog
from imbssl.diagnostics.tracker import PseudoLabelTracker
from imbssl.engine import distributed as ddp
from imbssl.engine.config import OptimConfig, TrainerConfig, typed
from imbssl.engine.periodic import PeriodicWork
from imbssl.engine.phases import DataPhases
from imbssl.engine.rng import rng_state, seed_everything
from imbssl.engine.run_dir import write_summary_anyway
from imbssl.engine.scalars import ScalarLog, _Accumulator, due
from imbssl.engine.setup import build_optimizer, lr_factor, resolve_device
from imbssl.engine.state import CHECKPOINT_FORMAT, RunState, check_compatible
from imbssl.engine.stops import (
    PREEMPTION_SIGNALS,
    NonFiniteLossError,
    Preempted,
    Stops,
    signals_as_flag,
)
from imbssl.engine.validation import check_all
from imbssl.errors import UserError
from imbssl.models import EMA, ModelConfig, build_model
from imbssl.pseudo import build_refiner, refiner_config

__all__ = ["CHECKPOINT_FORMAT", "PREEMPTION_SIGNALS", "NonFiniteLossError", "Preempted",
           "Trainer", "build_optimizer", "check_compatible", "lr_factor", "resolve_device",
           "signals_as_flag", "timed_run"]


class Trainer(RunState, PeriodicWork, DataPhases, ScalarLog, Stops):
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
        algo_cfg = typed(cfg, "algorithm", get_algorithm(str(cfg.algorithm.name)).Config)
        algo_cls = algorithm_class(str(cfg.algorithm.name), algo_cfg)
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
        self._lock = None  # RUN/.lock while this run may write its folder (process 0)
        self._resume_changes: dict = {}  # config keys a resume changed (RESUMABLE_KEYS)
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

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        """Train to ``trainer.iterations`` (resuming if asked) and return the summary; the
        run folder's lock is released at the end, however the run ends."""
        try:
            return self._run()
        finally:
            self.release_lock()

    def _run(self) -> dict:
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
                self._train_loop(progress)
            if self._saved_step != self.step_count:  # not checked by a checkpoint
                self.check_finite()
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
            write_summary_anyway(self.run_dir, self.log, status)  # even on a full disk
            if full is not None and full is not exc:
                raise full from exc
            raise
        finally:
            progress.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        summary = self.summary("finished")
        write_summary_anyway(self.run_dir, self.log, summary)  # even on a full disk
        if self.is_main:
            if self._last_test is not None:
                self._print_final()
            if self.tcfg.report:
                self._guarded("report", self.write_report, fallback=self._write_plain_report)
                if self._missing:
                    summary = self.summary("finished")
                    self._write_summary(summary)
        return summary

    # ----------------------------------------------------------------- the loop
    def _train_loop(self, progress) -> None:
        """Train to ``trainer.iterations``: everything that happens, in order. The periodic
        work runs only at its intervals (and at the last step); every checkpoint step is also
        a flush step, so no log sum is pending in a checkpoint and a non-finite loss stops the
        run before its checkpoint is written."""
        t = self.tcfg
        while self.step_count < t.iterations:
            self.train_step()  # lr, batch, algo.step, backward, gradient all-reduce, EMA
            progress.update(1)
            step = self.step_count
            if self._flush_step():  # log, eval or checkpoint step: the host syncs here only
                self._log_train_scalars(progress)  # (a non-finite loss stops the run here)
            if due(step, t.eval_interval, t.iterations):
                self._evaluate_or_note()  # EMA model on test/valid, pseudo-label diagnostics
            if self.algo.labeled_update_due(step, t.iterations):  # after evaluating (CReST)
                self.update_labeled_set()  # label_predictor on U -> a new labeled set
            if due(step, t.checkpoint_interval, t.iterations):
                self.save()
            if step < t.iterations and self._preemption_requested():
                self._preempt()  # checkpoint this step and raise Preempted

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
        if self.algo.labeled_views:  # after the unlabeled views: no other method draws them
            batch.x_lb_views = [self._prepare(aug.view(v, x, gen)[lb])
                                for v in self.algo.labeled_views]
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


def timed_run(cfg: DictConfig, trainer: Trainer | None = None) -> dict:
    """Train and print the wall time of the training part."""
    trainer = trainer if trainer is not None else Trainer(cfg)
    start = time.perf_counter()
    summary = trainer.run()
    if trainer.is_main:
        print(f"training time: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return summary
