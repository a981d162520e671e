"""The one training loop. It owns precision, optimizer, schedule, EMA, evaluation, logging and
checkpoints; what a step computes is the algorithm's business (``algo.step(batch, state)``).

Host syncs happen only at log, evaluation and checkpoint intervals: per-step scalars and
pseudo-label confusion matrices accumulate on the device.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.data import DatasetConfig, build_data
from imbssl.data.device_loader import BatchStream
from imbssl.diagnostics.logfile import RunLog
from imbssl.diagnostics.metrics import (
    confusion_to_metrics,
    format_per_class_table,
    median_of_last,
    per_class_rows,
)
from imbssl.diagnostics.tracker import PseudoLabelTracker
from imbssl.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from imbssl.engine.config import OptimConfig, TrainerConfig, to_object
from imbssl.engine.evaluate import confusion_matrix
from imbssl.engine.rng import rng_state, seed_everything, set_rng_state
from imbssl.engine.run_dir import environment, git_commit, prepare_run_dir, write_meta
from imbssl.errors import UserError
from imbssl.models import EMA, ModelConfig, build_model
from imbssl.pseudo import build_refiner


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but CUDA is not available; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a torch device; use auto, cpu or cuda") from None


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":  # FixMatch: cos(7 pi k / (16 K))
        return math.cos(7.0 * math.pi * step / (16.0 * total))
    return 1.0


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """SGD (Nesterov) without weight decay on biases and batch-norm parameters (FixMatch)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "bn" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           **fast)


class Trainer:
    """Builds data, network, EMA, algorithm and optimizer from a config and runs the loop."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.tcfg: TrainerConfig = to_object(cfg.trainer, TrainerConfig)
        self.ocfg: OptimConfig = to_object(cfg.optim, OptimConfig)
        self.mcfg: ModelConfig = to_object(cfg.model, ModelConfig)
        self.device = resolve_device(cfg.device)
        validate(self.tcfg, self.ocfg)
        if self.tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)

        self.data = build_data(to_object(cfg.dataset, DatasetConfig), self.device)
        k = self.data.num_classes
        algo_cls = get_algorithm(cfg.algorithm.name)
        algo_cfg = to_object(cfg.algorithm, algo_cls.Config)
        self.model = build_model(self.mcfg.name, k, self.data.image_shape[0]).to(self.device)
        self.model.heads.update(algo_cls.make_heads(algo_cfg, self.model.feat_dim, k))
        self.model.to(self.device)
        if self.device.type == "cuda" and self.mcfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, self.mcfg.ema_decay)
        refiner = build_refiner(cfg.get("pseudo"), k, self.model.feat_dim)
        self.algo = algo_cls(algo_cfg, k, self.model.feat_dim, self.data.labeled.labels,
                             refiner=refiner).to(self.device)
        self.optimizer = build_optimizer(self.model, self.ocfg, self.device)
        self.forward_model = (torch.compile(self.model) if self.tcfg.compile or self.mcfg.compile
                              else self.model)

        bs, uratio = self.tcfg.batch_size, algo_cfg.uratio
        self.labeled_stream = BatchStream(self.data.labeled, bs, cfg.seed * 1000 + 1, self.device)
        self.unlabeled_stream = BatchStream(self.data.unlabeled, bs * uratio,
                                            cfg.seed * 1000 + 2, self.device)
        self.aug_gen = torch.Generator(device=self.device)
        self.aug_gen.manual_seed(cfg.seed * 1000 + 3)
        self.precision = self._precision()
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.precision == torch.float16)
        self.tracker = PseudoLabelTracker(k, self.device)
        self.log = RunLog(self.run_dir)
        self.step_count = 0
        self.eval_history: dict[str, list[float]] = {}
        self._scalars: dict[str, Tensor] = {}
        self._scalar_steps = 0
        self._last_test: dict | None = None
        self._tb = None

    # ----------------------------------------------------------------- setup helpers
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
        if self.device.type == "cuda" and self.mcfg.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ----------------------------------------------------------------- the loop
    def next_batch(self) -> tuple[Batch, Tensor | None]:
        """Sample and augment one step's batch; returns it and the unlabeled true labels."""
        aug, gen = self.data.augmenter, self.aug_gen
        x, y, idx = self.labeled_stream.next()
        batch = Batch(x_lb=self._prepare(aug.weak(x, gen)), y_lb=y, idx_lb=idx)
        y_ulb = None
        if self.algo.unlabeled_views:
            xu, y_ulb, idx_u = self.unlabeled_stream.next()
            batch.x_ulb = [self._prepare(aug.view(v, xu, gen)) for v in self.algo.unlabeled_views]
            batch.idx_ulb = idx_u
        return batch, y_ulb

    def train_step(self) -> None:
        step = self.step_count
        for group in self.optimizer.param_groups:
            group["lr"] = self.ocfg.lr * lr_factor(step, self.tcfg.iterations,
                                                   self.ocfg.schedule, self.ocfg.warmup_iters)
        batch, y_ulb = self.next_batch()
        state = StepState(step, self.tcfg.iterations, self.forward_model, self.ema.model)
        with self.autocast():
            loss, logs = self.algo.step(batch, state)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self._accumulate(loss, logs, y_ulb)
        self.step_count += 1

    def _accumulate(self, loss: Tensor, logs: dict[str, Tensor], y_ulb: Tensor | None) -> None:
        scalars = {"loss/total": loss.detach()}
        scalars.update({k: v for k, v in logs.items() if v.ndim == 0})
        for key, value in scalars.items():
            value = value.detach().float()
            prev = self._scalars.get(key)
            self._scalars[key] = value if prev is None else prev + value
        self._scalar_steps += 1
        if y_ulb is not None:
            self.tracker.update({k: v for k, v in logs.items() if k.startswith("pseudo/")}, y_ulb)

    def flush_scalars(self) -> dict[str, float]:
        """Average the accumulated scalars (one host transfer); raise on a non-finite loss."""
        if not self._scalars:
            return {}
        keys = list(self._scalars)
        values = (torch.stack([self._scalars[k] for k in keys]) / self._scalar_steps).tolist()
        self._scalars, self._scalar_steps = {}, 0
        means = dict(zip(keys, values, strict=True))
        bad = [k for k, v in means.items() if k.startswith("loss/") and not math.isfinite(v)]
        if bad:
            terms = [k for k in bad if k != "loss/total"] or bad
            raise NonFiniteLossError(
                f"non-finite loss at or before step {self.step_count} in {', '.join(terms)}; "
                "the last good checkpoint is kept (lower optim.lr or check the data)")
        return means

    def run(self) -> dict:
        """Train to ``trainer.iterations`` (resuming if asked) and return the summary."""
        prepare_run_dir(self.run_dir, bool(self.cfg.resume), bool(self.cfg.overwrite))
        if self.cfg.resume:
            self.load_latest()
        else:
            self._write_config()
        total = self.tcfg.iterations
        self.log.write_summary(self.summary("running"))
        progress = self._progress(total)
        try:
            while self.step_count < total:
                self.train_step()
                progress.update(1)
                self._periodic(progress)
            if self._last_test is None or self._last_test.get("step") != self.step_count:
                self.evaluate()
        except BaseException:
            self.log.write_summary(self.summary("stopped"))
            raise
        finally:
            progress.close()
        summary = self.summary("finished")
        self.log.write_summary(summary)
        self._print_final()
        if self.tcfg.report:
            self.write_report()
        return summary

    def write_report(self) -> None:
        """Plots + HTML/Markdown report of this run (also: ``imbssl report RUN``)."""
        from imbssl.diagnostics.report import build_report

        html, md = build_report([self.run_dir], self.run_dir / "report")
        print(f"report: {html} (and {md.name})")

    def _periodic(self, progress) -> None:
        step, t = self.step_count, self.tcfg
        at = lambda every: every > 0 and (step % every == 0 or step == t.iterations)  # noqa: E731
        if at(t.log_interval) or at(t.eval_interval) or at(t.checkpoint_interval):
            scalars = self.flush_scalars()
            if scalars:
                row = {"step": step, "split": "train", "lr": self.optimizer.param_groups[0]["lr"],
                       **scalars}
                self.log.append_metrics(row)
                self._tensorboard(row)
                progress.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in scalars.items()
                                      if k.startswith("loss/")}, refresh=False)
        if at(t.eval_interval):
            self.evaluate()
        if at(t.checkpoint_interval):
            self.save()

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """EMA model on test (and validation) + pseudo-label diagnostics since the last call."""
        step, names = self.step_count, self.data.class_names
        results = {}
        splits = [("test", self.data.test)] + ([("valid", self.data.valid)]
                                              if self.data.valid is not None else [])
        for split, tset in splits:
            conf = confusion_matrix(self.ema.model, tset.images, tset.labels,
                                    lambda x: self._prepare(self.data.augmenter.normalize(x)),
                                    self.data.num_classes, self.tcfg.eval_batch_size,
                                    self.autocast).cpu().numpy()
            metrics = confusion_to_metrics(conf)
            row = {"step": step, "split": split, "top1": float(metrics["top1"]),
                   "balanced_acc": float(metrics["balanced_acc"])}
            self.log.append_metrics(row)
            self._tensorboard(row)
            self.log.append_per_class(per_class_rows(step, split, "prediction", "all",
                                                     metrics, names))
            for key in ("top1", "balanced_acc"):
                self.eval_history.setdefault(f"{split}/{key}", []).append(row[key])
            results[split] = {**row, "metrics": metrics}
            if split == "test":
                self.log.write_confusion(conf)
        pseudo_rows = self.tracker.flush(step, names)
        if pseudo_rows:
            self.log.append_per_class(pseudo_rows)
            self.log.append_metrics({"step": step, "split": "pseudo",
                                     **self.tracker.last_summary})
        self._last_test = results["test"]
        self.log.write_summary(self.summary("running"))
        return results

    def summary(self, status: str) -> dict:
        n = self.tcfg.summary_last
        final = {k: v[-1] for k, v in self.eval_history.items()}
        med = {k: float(median_of_last(v, n)) for k, v in self.eval_history.items()}
        return {"status": status, "step": self.step_count, "final": final,
                f"median_last{n}": med, "summary_last": n}

    def _print_final(self) -> None:
        metrics = self._last_test["metrics"]
        print(format_per_class_table(metrics, self.data.class_names, self.data.labeled_counts))
        med = median_of_last(self.eval_history["test/balanced_acc"], self.tcfg.summary_last)
        print(f"final test balanced accuracy: {metrics['balanced_acc'] * 100:.2f}%  "
              f"(top-1 {metrics['top1'] * 100:.2f}%; median of last "
              f"{min(self.tcfg.summary_last, len(self.eval_history['test/balanced_acc']))} "
              f"evaluations {med * 100:.2f}%)")
        print(f"run folder: {self.run_dir}")

    # ----------------------------------------------------------------- logging helpers
    def _progress(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step_count, desc="train", dynamic_ncols=True,
                    disable=not self.tcfg.progress, file=sys.stderr, mininterval=1.0)

    def _tensorboard(self, row: dict) -> None:
        if not self.tcfg.tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tcfg.tensorboard = False
                return
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
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
            "trainer": asdict(self.tcfg), "command": sys.argv,
        })

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "num_classes": self.data.num_classes,
            "model_name": self.mcfg.name,
            "algorithm_name": str(self.cfg.algorithm.name),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "algorithm": self.algo.state_dict(),
            "labeled_stream": self.labeled_stream.state_dict(),
            "unlabeled_stream": self.unlabeled_stream.state_dict(),
            "aug_generator": self.aug_gen.get_state(),
            "rng": rng_state(),
            "tracker": self.tracker.state_dict(),
            "eval_history": {k: list(v) for k, v in self.eval_history.items()},
        }

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.run_dir / "checkpoints", self.step_count,
                               self.tcfg.keep_checkpoints)

    def load_state_dict(self, state: dict) -> None:
        check_compatible(state, self.data.num_classes, self.mcfg.name)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.algo.load_state_dict(state["algorithm"])
        self.labeled_stream.load_state_dict(state["labeled_stream"])
        self.unlabeled_stream.load_state_dict(state["unlabeled_stream"])
        self.aug_gen.set_state(state["aug_generator"].cpu())
        set_rng_state(state["rng"])
        self.tracker.load_state_dict(state["tracker"])
        self.eval_history = {k: list(v) for k, v in state["eval_history"].items()}
        self.step_count = int(state["step"])

    def load_latest(self) -> None:
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            raise UserError(f"resume=true but {self.run_dir}/checkpoints holds no checkpoint; "
                            "run without resume=true to start")
        self.load_state_dict(load_checkpoint(path, self.device))
        print(f"resumed from {path} at step {self.step_count}", file=sys.stderr)
        if self.step_count > self.tcfg.iterations:
            raise UserError(f"the checkpoint is at step {self.step_count}, past "
                            f"trainer.iterations={self.tcfg.iterations}; raise trainer.iterations")


def check_compatible(state: dict, num_classes: int, model_name: str) -> None:
    """A checkpoint from another number of classes or model is a one-line error."""
    if int(state.get("num_classes", -1)) != num_classes:
        raise UserError(f"checkpoint has {state.get('num_classes')} classes but the dataset has "
                        f"{num_classes}; use a checkpoint of this dataset")
    if state.get("model_name") != model_name:
        raise UserError(f"checkpoint was trained with model={state.get('model_name')} but "
                        f"model={model_name} is configured; set model={state.get('model_name')}")


def validate(t: TrainerConfig, o: OptimConfig) -> None:
    """Values a schema's types cannot check."""
    checks = [
        (t.iterations >= 1, f"trainer.iterations must be >= 1, got {t.iterations}"),
        (t.batch_size >= 1, f"trainer.batch_size must be >= 1, got {t.batch_size}"),
        (t.eval_interval >= 1, f"trainer.eval_interval must be >= 1, got {t.eval_interval}"),
        (t.precision in ("auto", "bf16", "fp16", "fp32"),
         f"trainer.precision must be auto, bf16, fp16 or fp32, got {t.precision!r}"),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (o.schedule in ("constant", "cosine"),
         f"optim.schedule must be constant or cosine, got {o.schedule!r}"),
        (o.name == "sgd", f"optim.name must be sgd, got {o.name!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def timed_run(cfg: DictConfig) -> dict:
    """Train and print the wall time of the training part."""
    trainer = Trainer(cfg)
    start = time.perf_counter()
    summary = trainer.run()
    print(f"training time: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return summary
