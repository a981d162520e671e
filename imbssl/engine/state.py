"""The run's state on disk: the run folder (checked before any write, then created or
truncated), checkpoints of everything that shapes the rest of the run, and exact resume.

A checkpoint holds weights, EMA, optimizer, grad scaler, every random generator, the batch
streams' positions, the labeled-set additions, the algorithm's buffers (non-persistent ones
too), the pseudo-label tracker, pending log sums and the evaluation history. On resume the
rows logged after the checkpoint are dropped from ``metrics.jsonl`` and ``per_class.csv``, so
a resumed run's files equal an uninterrupted run's; a damaged newest checkpoint is named,
set aside (``*.damaged``) and the newest good one is loaded."""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf
from torch import Tensor

from imbssl.diagnostics.loggers import check_logger, open_run_log
from imbssl.engine import distributed as ddp
from imbssl.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    newest_loadable,
    non_finite_tensors,
    remove_partial,
    save_checkpoint,
)
from imbssl.engine.rng import rng_state, set_rng_state
from imbssl.engine.run_dir import (
    check_resume_config,
    check_run_dir,
    environment,
    git_commit,
    prepare_run_dir,
    record_resume,
    take_run_lock,
    truncate_logs,
    write_meta,
)
from imbssl.engine.scalars import _Accumulator
from imbssl.engine.stops import NonFiniteLossError
from imbssl.errors import UserError

CHECKPOINT_FORMAT = 2


class RunState:
    """Run folder, checkpoints and resume (a part of :class:`imbssl.engine.trainer.Trainer`;
    owns ``_prepared``, ``_resumed_from``, ``_resumed_at``, ``_damaged``, ``_saved_step``,
    ``_lock``, ``_resume_changes``)."""

    def prepare(self) -> None:
        """Check the run folder and, with ``resume=true``, load its last checkpoint. Writes
        nothing, so a failure leaves an existing run folder untouched."""
        if self._prepared:
            return
        check_run_dir(self.run_dir, self.resume, self.overwrite)
        check_logger(self.cfg)  # logger=wandb/mlflow: the package is there, before any write
        self._lock = take_run_lock(self.run_dir, self.is_main, self.device)  # one writer
        try:
            check_run_dir(self.run_dir, self.resume, self.overwrite)  # again, under the lock
            if self.resume:  # the run's own config first: then its checkpoint
                self._resume_changes = check_resume_config(self.run_dir, self.cfg)
                self.load_latest()
        except BaseException:
            self.release_lock()
            raise
        ddp.barrier()  # every process has checked the folder before process 0 writes to it
        self._prepared = True

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start(self) -> None:
        """The first writes: clear (overwrite=true) or truncate (resume=true) the folder."""
        if self.is_main:
            if self.resume:
                remove_partial(self.run_dir / "checkpoints")
                for bad, _ in self._damaged:  # kept for inspection, out of every listing
                    bad.replace(bad.with_name(bad.name + ".damaged"))
                truncate_logs(self.run_dir, self.step_count)
                record_resume(self.run_dir, self.cfg, self.step_count, self._resume_changes)
            else:
                prepare_run_dir(self.run_dir, False, self.overwrite)
                self._write_config()
            self.log = open_run_log(self.run_dir, self.cfg)  # + wandb/mlflow (logger=...)
        ddp.barrier()
        if not self.resume:
            set_rng_state(self._start_rng)

    def _write_config(self) -> None:
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        write_meta(self.run_dir, {
            **git_commit(), **environment(self.device), "seed": int(self.cfg.seed),
            "class_names": self.data.class_names, "labeled_counts": self.data.labeled_counts,
            "unlabeled_counts": self.data.unlabeled_counts,
            "trainer": asdict(self.tcfg), "world_size": self.world, "command": sys.argv,
            # the algorithm's settings as it trains with them: config.yaml keeps what was
            # composed, where a field may be null for "the method's own value" (CoSSL's base)
            "algorithm": asdict(self.algo.cfg),
        })

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

    def save(self) -> Path | None:
        """Checkpoint the current step (process 0 writes; every process must call it)."""
        self.check_finite()
        state = self.state_dict()
        path = None
        if self.is_main:
            path = save_checkpoint(state, self.run_dir / "checkpoints", self.step_count,
                                   self.tcfg.keep_checkpoints)
        self._saved_step = self.step_count
        return path

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` unless every parameter and buffer of the model and the
        EMA model and every optimizer state is finite: a checkpoint never holds NaN or inf, so
        "the last good checkpoint" is one (every process checks its replica)."""
        bad = non_finite_tensors({"model": self.model.state_dict(),
                                  "ema": self.ema.model.state_dict(),
                                  "optimizer": self.optimizer.state_dict()["state"]})
        if ddp.any_process(bool(bad), self.device):
            found = list_checkpoints(self.run_dir / "checkpoints")
            kept = (f"the last good checkpoint {found[-1][1].name} is kept" if found
                    else "no checkpoint had been written")
            named = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NonFiniteLossError(
                f"the network diverged: non-finite (NaN or inf) values by step "
                f"{self.step_count} in {named or 'another process'} although every logged "
                f"loss was finite; no checkpoint was written and {kept}; lower optim.lr or use "
                "trainer.precision=fp32")

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
