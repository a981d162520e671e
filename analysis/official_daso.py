"""Issue 31: the official DASO code beside imbssl at the mini protocol, on the same images.

    python analysis/official_daso_queue.py --official /path/to/daso-checkout  # train (resumable)
    python analysis/official_daso.py                    # the comparison, from the run folders
    python analysis/official_daso.py --convert RUN_DIR  # official logs -> imbssl records again

Three files work together: ``official_daso_run.py`` trains the official code (pinned commit,
shims listed in its docstring), ``official_daso_queue.py`` runs the 12-run matrix one job at a
time, and this file (1) converts an official run's logs into imbssl's run-folder records and
(2) writes ``analysis/results/official_side_by_side.md`` with its figure from the finished run
folders of both codes.

Conversion (``convert_run``): ``official_output/<experiment>/metrics.json`` (the official
JSONWriter, one line per evaluation: ``test/top1`` and ``test_classwise/<c>`` in %, losses)
and ``instrument.jsonl`` (the runner's taps: mask ratio and seconds per step every 50
iterations; per evaluation window the confusion counts of the linear, semantic and final
pseudo-labels against the unlabeled images' true labels, and DASO's m_hat) become:

* ``metrics.jsonl``: train rows (``mask/ratio``, ``loss/*``), test and valid rows (``top1``,
  ``balanced_acc`` = mean of the official per-class accuracies), pseudo rows
  (``pseudo/<kind>/all/{acc,balanced_acc,precision_macro,count}``);
* ``per_class.csv``: test / valid recall per class, pseudo-label recall and precision per
  class and kind, DASO's m_hat per class (``refiner,daso,...,m_hat``);
* ``summary.json`` (final and median of the last 5 evaluations), ``config.yaml`` (imbssl's
  keys, the values read from the official config dump), ``meta.json`` (official commit,
  counts, attempts, timing, the same-images check).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from imbssl.diagnostics.logfile import read_jsonl  # noqa: E402  (one reader, re-exported)

RUNS = ROOT / "analysis/results/official_side_by_side_runs"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")
KINDS = ("linear", "semantic", "final")
SUMMARY_LAST = 5
OFFICIAL_REPO = "github.com/ytaek-oh/daso"


# ----------------------------------------------------------------------------- reading
def official_output(run_dir: Path) -> Path:
    """The official experiment folder (default_setup's OUTPUT_DIR/<experiment name>)."""
    found = sorted(p.parent for p in (run_dir / "official_output").glob("*/metrics.json"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no official_output/*/metrics.json")
    return found[-1]


def classwise(row: dict, split: str) -> dict[int, float]:
    """{class: fraction} from the official ``<split>_classwise/<c>`` entries (percent)."""
    prefix = f"{split}_classwise/"
    out = {}
    for key, value in row.items():
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            out[int(key[len(prefix):])] = float(value) / 100.0
    return out


def confusion_stats(conf: list[list[int]]) -> dict:
    """Per-class recall and precision (None when undefined) of a truth x label count matrix."""
    k = len(conf)
    rows = [sum(r) for r in conf]
    cols = [sum(conf[t][c] for t in range(k)) for c in range(k)]
    recall = [conf[c][c] / rows[c] if rows[c] else None for c in range(k)]
    precision = [conf[c][c] / cols[c] if cols[c] else None for c in range(k)]
    total = sum(rows)
    return {"recall": recall, "precision": precision, "count": total,
            "acc": sum(conf[c][c] for c in range(k)) / total if total else None}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


# ----------------------------------------------------------------------------- conversion
def convert_rows(official_rows: list[dict], instrument_rows: list[dict], num_classes: int
                 ) -> tuple[list[dict], list[list]]:
    """(metrics.jsonl rows, per_class.csv rows) from the official log and the runner's taps."""
    metrics: dict[tuple[int, str], dict] = {}
    per_class: list[list] = []

    def row(step: int, split: str) -> dict:
        return metrics.setdefault((step, split), {"step": step, "split": split})

    def class_rows(step, source, kind, metric, values):
        for c, value in values.items() if isinstance(values, dict) else enumerate(values):
            if value is not None:
                name = CLASS_NAMES[c] if num_classes == len(CLASS_NAMES) else str(c)
                per_class.append([step, source, kind, "all", c, name, metric, value])

    for r in instrument_rows:
        step = int(r["step"])
        if r.get("kind") == "train":
            train = row(step, "train")
            if r.get("mask_ratio") is not None:
                train["mask/ratio"] = r["mask_ratio"]
            train["time/step_s"] = r.get("step_wall_s")
            train["time/step_cpu_s"] = r.get("step_cpu_s")
        elif r.get("kind") == "pseudo":
            pseudo = row(step, "pseudo")
            for kind, conf in (r.get("confusion") or {}).items():
                stats = confusion_stats(conf)
                pseudo[f"pseudo/{kind}/all/acc"] = stats["acc"]
                pseudo[f"pseudo/{kind}/all/balanced_acc"] = _mean(stats["recall"])
                pseudo[f"pseudo/{kind}/all/precision_macro"] = _mean(stats["precision"])
                pseudo[f"pseudo/{kind}/all/count"] = float(stats["count"])
                class_rows(step, "pseudo", kind, "recall", stats["recall"])
                class_rows(step, "pseudo", kind, "precision", stats["precision"])
            if r.get("m_hat") is not None:
                class_rows(step, "refiner", "daso", "m_hat", r["m_hat"])
    for r in official_rows:
        step = int(r["iteration"])
        losses = {"loss/labeled": r.get("train/loss_cls"),
                  "loss/unlabeled": r.get("train/loss_cons"),
                  "loss/align": r.get("train/loss_assign")}
        losses = {k: v for k, v in losses.items() if v is not None}
        if losses:
            train = row(step, "train")
            train.update(losses)
            train["loss/total"] = sum(losses.values())
        for split in ("test", "valid"):
            if f"{split}/top1" not in r:
                continue
            recall = classwise(r, split)
            out = row(step, split)
            out["top1"] = float(r[f"{split}/top1"]) / 100.0
            out["balanced_acc"] = _mean(recall.values())
            class_rows(step, split, "prediction", "recall", recall)
    order = {"train": 0, "test": 1, "valid": 2, "pseudo": 3}
    rows = sorted(metrics.values(), key=lambda m: (m["step"], order.get(m["split"], 9)))
    return rows, per_class


def summary_of(rows: list[dict], last: int = SUMMARY_LAST) -> dict:
    """imbssl's summary.json: final evaluation and the median of the last ``last`` ones."""
    final, median = {}, {}
    for split in ("test", "valid"):
        evals = [r for r in rows if r["split"] == split]
        for key in ("top1", "balanced_acc"):
            values = [r[key] for r in evals if r.get(key) is not None]
            if values:
                final[f"{split}/{key}"] = values[-1]
                median[f"{split}/{key}"] = statistics.median(values[-last:])
    step = max((r["step"] for r in rows), default=0)
    return {"status": "finished", "step": step, "final": final,
            f"median_last{last}": median, "summary_last": last}


def imbssl_config(official_cfg: dict, method: str, seed: int) -> dict:
    """imbssl's config keys for an official run, the values read from its config dump."""
    d, solver, daso = official_cfg["DATASET"], official_cfg["SOLVER"], official_cfg["ALGORITHM"]
    c10 = d["CIFAR10"]
    cfg = {
        "code": "official",
        "experiment_name": f"official_cifar10_lt_g100_n1500_uniform_{method}",
        "seed": seed,
        "dataset": {"name": "cifar10", "n1": c10["NUM_LABELED_HEAD"],
                    "m1": c10["NUM_UNLABELED_HEAD"], "gamma_l": float(c10["IMB_FACTOR_L"]),
                    "gamma_u": float(c10["IMB_FACTOR_UL"]),
                    "reverse_unlabeled": bool(d["REVERSE_UL_DISTRIBUTION"]),
                    "num_valid_per_class": d["NUM_VALID"] // 10,
                    "split_protocol": "official_daso", "seed": seed},
        "algorithm": {"name": "fixmatch", "uratio": solver["UNLABELED_BATCH_RATIO"],
                      "threshold": daso["CONFIDENCE_THRESHOLD"], "dist_align": "none"},
        "pseudo": {"name": "none"},
        "model": {"name": "wrn16_1", "ema_decay": official_cfg["MODEL"]["EMA_DECAY"],
                  "width": official_cfg["MODEL"]["WIDTH"]},
        "optim": {"name": "sgd", "lr": solver["BASE_LR"], "momentum": solver["SGD"]["MOMENTUM"],
                  "weight_decay": solver["SGD"]["WEIGHT_DECAY"],
                  "nesterov": solver["SGD"]["NESTEROV"]},
        "trainer": {"iterations": solver["MAX_ITER"], "batch_size": solver["IMS_PER_BATCH"],
                    "eval_interval": official_cfg["PERIODS"]["EVAL"],
                    "summary_last": SUMMARY_LAST},
    }
    if method.endswith("daso"):
        cfg["pseudo"] = {"name": "daso", "queue_size": official_cfg["MODEL"]["QUEUE"]["MAX_SIZE"],
                         "proto_temperature": daso["DASO"]["PROTO_TEMP"],
                         "dist_temperature": daso["DASO"]["DIST_TEMP"],
                         "warmup_iters": daso["DASO"]["PRETRAIN_STEPS"],
                         "dist_window": daso["DASO"]["PL_DIST_UPDATE_PERIOD"],
                         "align_weight": daso["DASO"]["PSA_LOSS_WEIGHT"],
                         "blend_mode": "distribution" if daso["DASO"]["WITH_DIST_AWARE"]
                         else "fixed"}
    return cfg


def convert_run(run_dir: Path) -> dict:
    """Write imbssl's records into an official run folder; returns its summary."""
    import yaml

    run_dir = Path(run_dir)
    out = official_output(run_dir)
    official_cfg = yaml.safe_load((out / "config.yaml").read_text())
    method = "fixmatch_daso" if official_cfg["ALGORITHM"]["NAME"] == "DASO" else "fixmatch"
    seed = int(official_cfg["SEED"])
    k = int(official_cfg["MODEL"]["NUM_CLASSES"])
    rows, per_class = convert_rows(read_jsonl(out / "metrics.json"),
                                   read_jsonl(run_dir / "instrument.jsonl"), k)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    with open(run_dir / "per_class.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "source", "kind", "subset", "class", "class_name", "metric", "value"])
        w.writerows(per_class)
    summary = summary_of(rows)
    done = out.parent / "done.json"
    if not done.is_file():
        summary["status"] = "running"
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(imbssl_config(official_cfg, method,
                                                                      seed), sort_keys=False))
    attempts = read_jsonl(run_dir / "run_attempts.jsonl")
    first = attempts[0] if attempts else {}
    meta = {"code": "official", "official_repo": OFFICIAL_REPO,
            "official_commit": first.get("official_commit"),
            "runner": "analysis/official_daso_run.py", "git_commit": first.get("git_commit"),
            "torch": first.get("torch"), "device": "cpu", "num_threads": first.get("num_threads"),
            "seed": seed, "class_names": list(CLASS_NAMES[:k]) if k == 10 else None,
            "labeled_counts": first.get("labeled_counts"),
            "unlabeled_counts": first.get("unlabeled_counts"),
            "same_images_as_imbssl": first.get("same_images_as_imbssl"),
            "attempts": attempts, "resumed": len(attempts) > 1,
            "training": json.loads(done.read_text()) if done.is_file() else None}
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--convert", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="convert this official run folder's logs again (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "analysis/results")
    args = p.parse_args(argv)
    for run_dir in args.convert:
        try:
            convert_run(run_dir)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.convert:
        return 0
    from official_daso_compare import write_comparison  # noqa: E402 (beside this file)

    write_comparison(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
