"""Periodic work between steps: the training scalars' log row, evaluation of the EMA model
on the test (and validation) sets with the pseudo-label and refiner diagnostics, the summary,
TensorBoard, and the report at the end."""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from imbssl.diagnostics.metrics import (
    confusion_to_metrics,
    format_per_class_table,
    per_class_rows,
)
from imbssl.diagnostics.summary_stats import (
    EVAL_METRICS,
    console_lines,
    evaluation_scores,
    summarize,
)
from imbssl.diagnostics.tracker import diagnostic_rows
from imbssl.engine import distributed as ddp
from imbssl.engine.evaluate import measured_confusions
from imbssl.fileio import is_disk_full


class PeriodicWork:
    """Logging, evaluation and reports (a part of :class:`imbssl.engine.trainer.Trainer`;
    owns ``eval_history``, ``_last_test``, ``_last_eval_step``, ``_tb``; writes through ``log``)."""

    def _log_train_scalars(self, progress) -> None:
        """The ``train`` row of metrics.jsonl: the scalars averaged since the last flush."""
        scalars = self.flush_scalars()
        if scalars:
            row = {"step": self.step_count, "split": "train",
                   "lr": self.optimizer.param_groups[0]["lr"], **scalars}
            self._append_metrics(row)
            progress.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in scalars.items()
                                  if k.startswith("loss/")}, refresh=False)

    def _evaluate_or_note(self) -> None:
        self._guarded("evaluation", self.evaluate)

    def _measure(self, split: str, tset) -> dict:
        """The evaluated network (``algo.eval_network``: EMA by default) on ``tset``: each
        process counts its shard of the images, summed."""
        part = ddp.shard(len(tset.images))
        net = self.algo.eval_network(self.model, self.ema.model)
        confs = measured_confusions(net, tset.images[part], tset.labels[part],
                                    lambda x: self._prepare(self.data.augmenter.normalize(x)),
                                    self.data.num_classes, self.tcfg.eval_batch_size,
                                    self.autocast, self.algo.eval_predictor(net),
                                    self.initial_labeled.labels)
        confs = ddp.all_reduce_sum(confs).cpu().numpy()
        return {"step": self.step_count, "split": split, **evaluation_scores(confs),
                "metrics": confusion_to_metrics(confs[0]), "confusion": confs[0]}

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
            row = {k: res[k] for k in ("step", "split", *EVAL_METRICS) if k in res}
            self._append_metrics(row)
            if self.log is not None:
                self.log.append_per_class(per_class_rows(step, split, "prediction", "all",
                                                         res["metrics"], names))
                if split == "test":
                    self.log.write_confusion(res["confusion"])
            for key in (k for k in EVAL_METRICS if k in row):
                self.eval_history.setdefault(f"{split}/{key}", []).append(row[key])
            results[split] = res
        pseudo_rows = self.tracker.flush(step, names)  # all processes: sums the matrices
        if pseudo_rows and self.log is not None:
            self.log.append_per_class(pseudo_rows)
            self._append_metrics({"step": step, "split": "pseudo", **self.tracker.last_summary})
        if self.log is not None:  # e.g. DASO's m_hat and blend weights v per class
            self.log.append_per_class(diagnostic_rows(step, self.algo.per_class_diagnostics(),
                                                      names))
        self.algo.observe_evaluation(self.soft_predictions)  # e.g. DARP's estimation run
        self._last_test = results["test"]
        self._last_eval_step = step
        self._write_summary(self.summary("running"))
        return results

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

    def summary(self, status: str, error: str | None = None) -> dict:
        out = {"status": status, "step": self.step_count,
               **summarize(self.eval_history, self.tcfg.summary_last,
                          self.tcfg.summary_reduce)}
        if error:
            out["error"] = error
        if self._missing:  # evaluations or report parts that failed (training went on)
            out["missing"] = list(self._missing)
        return out

    def _print_final(self) -> None:
        metrics = self._last_test["metrics"]
        print(format_per_class_table(metrics, self.data.class_names, self.data.labeled_counts))
        print(console_lines(self.eval_history, self.tcfg.summary_last, metrics,
                            self.tcfg.summary_reduce))
        print(f"run folder: {self.run_dir}")

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
