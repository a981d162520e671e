"""CIFAR-10-LT on two CPU cores: the DASO paper's settings at the mini protocol's budget.

    python analysis/benchmark_cifar_mini.py                 # run what is missing, then tables
    python analysis/benchmark_cifar_mini.py --max-runs 2    # at most 2 runs this time
    python analysis/benchmark_cifar_mini.py --aggregate     # tables only, from the run folders
    python analysis/benchmark_cifar_mini.py --list          # the matrix and each run's state

The matrix (``MATRIX``, in priority order) runs the experiment rows of
``configs/experiment/mini/`` (WRN-16-1, 2000 iterations, labeled batch 32, the official DASO
recipe; docs/experiments.md) one after another, each as a real ``imbssl train`` process.
Resumable: a finished run is skipped, an interrupted one continues from its last checkpoint
(``resume=true``), so a killed batch, or one stopped by the end of a session, goes on where it
stopped. Run folders live in ``--runs`` (default analysis/results/cifar10_lt_mini_runs/, where
finished runs are committed without checkpoints, so the matrix can span sessions).

The tables (``--out``: cifar10_lt_mini.md, cifar10_lt_mini_runs.csv, cifar10_lt_mini_runs.json)
are computed from the run folders alone (config.yaml, meta.json, summary.json,
per_class.csv): per (setting, method), mean ± sample std over seeds of the test balanced
accuracy and top-1 (median of the last ``trainer.summary_last`` evaluations, and final), the
mean test recall of the three classes with the fewest labeled images, and, at the last
evaluation, the per-class recall and precision of the linear, semantic and final
pseudo-labels of the unlabeled images seen since the evaluation before.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imbssl.diagnostics.logfile import read_jsonl, read_per_class  # noqa: E402

ROW_PREFIX = "mini/cifar10_lt_g100_n1500"
SETTINGS = {"consistent": "", "uniform": "_uniform", "reversed": "_reversed"}
TAIL_SIZE = 3
PSEUDO_KINDS = ("linear", "semantic", "final")


@dataclass(frozen=True)
class Job:
    setting: str  # consistent | uniform | reversed ("all" for supervised)
    method: str  # supervised | fixmatch | fixmatch+daso | ...
    seed: int

    @property
    def row(self) -> str:
        algo, _, daso = self.method.partition("+")
        tag = SETTINGS.get(self.setting, "")
        return f"{ROW_PREFIX}{tag}_{algo}{'_daso' if daso else ''}"

    @property
    def name(self) -> str:
        return f"{self.row.split('/')[-1]}-seed{self.seed}"


def matrix() -> list[Job]:
    """Priority order of the mini-protocol issue: seed 0 of FixMatch +/- DASO on the uniform
    setting (the paper's largest gain), supervised, FixMatch +/- DASO on the other two; seeds
    1 and 2 of the same (supervised last within a seed, so the pairs' spread over seeds comes
    first); ReMixMatch +/- DASO (uniform, 2 seeds); MixMatch and SimMatch +/- DASO (uniform,
    1 seed)."""
    def core(seed: int) -> list[Job]:
        jobs = [Job("uniform", "fixmatch", seed), Job("uniform", "fixmatch+daso", seed)]
        for setting in ("consistent", "reversed"):
            jobs += [Job(setting, "fixmatch", seed), Job(setting, "fixmatch+daso", seed)]
        # seed 0: the baseline early; later seeds: the FixMatch pairs' spread first
        jobs.insert(2 if seed == 0 else len(jobs), Job("all", "supervised", seed))
        return jobs

    jobs = core(0) + core(1) + core(2)
    jobs += [Job("uniform", m, s) for s in (0, 1) for m in ("remixmatch", "remixmatch+daso")]
    jobs += [Job("uniform", m, 0) for m in ("mixmatch", "mixmatch+daso", "simmatch",
                                             "simmatch+daso")]
    return jobs


def select_jobs(jobs: list[Job], only: list[str]) -> list[Job]:
    """The jobs whose name contains one of ``only`` (all of them when ``only`` is empty)."""
    if not only:
        return jobs
    chosen = [j for j in jobs if any(part in j.name for part in only)]
    if not chosen:
        raise SystemExit(f"error: --only {only} matches no job of the matrix (see --list)")
    return chosen


# ----------------------------------------------------------------------------- running
def run_state(run_dir: Path) -> str:
    """missing | finished | resumable | broken (a folder without a checkpoint to resume)."""
    summary = _read_json(run_dir / "summary.json")
    if summary is None and not run_dir.exists():
        return "missing"
    if summary is not None and summary.get("status") == "finished":
        return "finished"
    if any((run_dir / "checkpoints").glob("*.pt")):
        return "resumable"
    return "broken"


def train_command(job: Job, run_dir: Path, state: str, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "imbssl", "train", f"experiment={job.row}", f"seed={job.seed}",
           f"run_dir={run_dir}", "trainer.progress=false", "trainer.report=false", *extra]
    if state == "resumable":
        cmd.append("resume=true")
    elif state == "broken":
        cmd.append("overwrite=true")
    return cmd


def run_matrix(jobs: list[Job], runs: Path, max_runs: int | None, extra: list[str]) -> None:
    started = 0
    for job in jobs:
        run_dir = runs / job.name
        state = run_state(run_dir)
        if state == "finished":
            continue
        if max_runs is not None and started >= max_runs:
            break
        started += 1
        print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {state} -> training", flush=True)
        t0 = time.time()
        log = runs / f"{job.name}.log"
        runs.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            rc = subprocess.call(train_command(job, run_dir, state, extra), cwd=ROOT,
                                 stdout=fh, stderr=subprocess.STDOUT)
        print(f"[{time.strftime('%H:%M:%S')}] {job.name}: exit {rc} after "
              f"{(time.time() - t0) / 60:.1f} min (log {log})", flush=True)
        if rc == 0:
            log.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def setting_of(cfg: dict) -> str:
    """consistent | uniform | reversed; "all" for supervised (no unlabeled data)."""
    if cfg["algorithm"]["name"] == "supervised":
        return "all"
    d = cfg["dataset"]
    if d.get("reverse_unlabeled"):
        return "reversed"
    return "uniform" if float(d["gamma_u"]) == 1.0 else "consistent"


def method_of(cfg: dict) -> str:
    """algorithm[+refiner]; DASO without blending and alignment loss is "+daso(neutral)" (it
    still runs the EMA model on the labeled batch to fill its queues)."""
    algo, pseudo = cfg["algorithm"]["name"], cfg.get("pseudo") or {}
    if pseudo.get("name") in (None, "none"):
        return algo
    no_blend = pseudo.get("blend") is False or pseudo.get("blend_mode") == "off"
    neutral = no_blend and float(pseudo.get("align_weight", 1.0)) == 0.0
    return f"{algo}+{pseudo['name']}" + ("(neutral)" if neutral else "")


def recipe_of(cfg: dict) -> str:
    """The configs/recipe/ file whose every value the run's config has, named after it.

    A key the run's config lacks (a switch added after the run) is named ("daso_official
    without dataset.x"), except a switch in ``_VALUE_BEFORE_SWITCH``, whose value before the
    switch existed is known and is used instead. A recipe matched except for such switches is
    named with their values ("daso_official but dataset.geometric_fill=128"). "custom" when
    no recipe matches."""
    for path in sorted((ROOT / "configs" / "recipe").glob("*.yaml")):
        pairs = []
        for group, values in _read_yaml(path).items():
            for key, want in values.items():
                name = f"{group}.{key}"
                have = (cfg.get(group) or {}).get(key, _VALUE_BEFORE_SWITCH.get(name, _MISSING))
                pairs.append((name, have, want))
        absent = [name for name, have, _ in pairs if have is _MISSING]
        if not any(key in (cfg.get(group) or {}) for group, values in _read_yaml(path).items()
                   for key in values):
            continue
        differ = [(name, have) for name, have, want in pairs if have not in (want, _MISSING)]
        if all(name in _VALUE_BEFORE_SWITCH for name, _ in differ):
            label = path.stem
            if absent:
                label += f" without {', '.join(absent)}"
            if differ:
                label += " but " + ", ".join(f"{name}={have}" for name, have in differ)
            return label
    return "custom"


_MISSING = object()
# Switches added after runs were committed, with the value the code had before they existed.
_VALUE_BEFORE_SWITCH = {"dataset.geometric_fill": 128}  # augment.py filled 128 before 0f71a46


def tail_classes(labeled_counts: list[int], k: int = TAIL_SIZE) -> list[int]:
    """The k classes with the fewest labeled images (ties: the later class first)."""
    order = sorted(range(len(labeled_counts)), key=lambda c: (labeled_counts[c], -c))
    return sorted(order[:k])


def _last_step_values(pc, source: str, kind: str, metric: str) -> dict[int, float]:
    rows = pc[(pc.source == source) & (pc.kind == kind) & (pc.subset == "all")
              & (pc.metric == metric)]
    if rows.empty:
        return {}
    last = rows[rows.step == rows.step.max()]
    return {int(c): float(v) for c, v in zip(last["class"], last["value"])}


def curve_values(run_dir: Path, at_step: int, last: int, total: int) -> dict:
    """Test balanced accuracy at ``at_step`` (DASO's warm-up end: before it, +DASO and the
    plain algorithm differ only by the EMA forward that fills the queues) and the mask ratio
    averaged over the logged intervals of the last ``last`` iterations."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    at = [r["balanced_acc"] for r in rows if r.get("split") == "test" and r["step"] == at_step]
    masks = [r["mask/ratio"] for r in rows if r.get("split") == "train"
             and "mask/ratio" in r and r["step"] > total - last]
    return {f"bal_acc_at_{at_step}": at[-1] if at else None,
            "mask_ratio_last": statistics.fmean(masks) if masks else None}


WARMUP_STEP = 500  # pseudo=daso_mini warm-up


def read_record(run_dir: Path) -> dict | None:
    """One run folder as a flat record, or None when it is not a finished run."""
    summary = _read_json(run_dir / "summary.json")
    meta = _read_json(run_dir / "meta.json") or {}
    if summary is None or summary.get("status") != "finished":
        return None
    cfg = _read_yaml(run_dir / "config.yaml")
    n = summary.get("summary_last")
    med = summary.get(f"median_last{n}", {})
    labeled = meta.get("labeled_counts") or meta.get("counts", {}).get("labeled") or []
    tails = tail_classes(list(labeled)) if labeled else [7, 8, 9]
    pc = read_per_class(run_dir)
    recall = _last_step_values(pc, "test", "prediction", "recall")
    rec = {
        "run": run_dir.name, "setting": setting_of(cfg), "method": method_of(cfg),
        "recipe": recipe_of(cfg),
        "seed": int(cfg.get("seed", 0)), "commit": meta.get("git_commit") or meta.get("commit"),
        "experiment": cfg.get("experiment_name"), "iterations": summary.get("step"),
        "summary_last": n,
        "bal_acc_median": med.get("test/balanced_acc"), "top1_median": med.get("test/top1"),
        "bal_acc_final": summary["final"].get("test/balanced_acc"),
        "top1_final": summary["final"].get("test/top1"),
        "tail_classes": tails,
        "tail_recall_final": (statistics.fmean(recall[c] for c in tails)
                              if all(c in recall for c in tails) else None),
        "test_recall": [recall.get(c) for c in range(len(recall))],
        **curve_values(run_dir, WARMUP_STEP, 500, int(summary.get("step") or 0)),
    }
    for kind in PSEUDO_KINDS:
        for metric in ("recall", "precision"):
            vals = _last_step_values(pc, "pseudo", kind, metric)
            if vals:
                rec[f"pseudo_{kind}_{metric}"] = [vals.get(c) for c in range(max(vals) + 1)]
    return rec


def read_records(runs: Path) -> list[dict]:
    out = []
    for d in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        rec = read_record(d)
        if rec is not None:
            out.append(rec)
    return out


# ----------------------------------------------------------------------------- tables
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1; None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float | None], scale: float = 100.0) -> str:
    vals = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    mean, std = mean_std(vals)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def group(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records by (setting, method); a recipe other than daso_official is part of the method."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        method = r["method"] if r.get("recipe", "daso_official") == "daso_official" \
            else f"{r['method']} [{r['recipe']}]"
        out.setdefault((r["setting"], method), []).append(r)
    return out


SETTING_ORDER = ["all", "consistent", "uniform", "reversed"]


def _order(key: tuple[str, str]) -> tuple:
    setting, method = key
    algo, _, daso = method.split(" ")[0].partition("+")
    algos = ["supervised", "fixmatch", "remixmatch", "mixmatch", "simmatch"]
    return (SETTING_ORDER.index(setting) if setting in SETTING_ORDER else -1,
            algos.index(algo) if algo in algos else 99, bool(daso), method)


def main_table(records: list[dict]) -> list[str]:
    lines = ["| setting | method | seeds | bal. acc. (median) | top-1 (median) | "
             "bal. acc. (final) | tail recall (final) | bal. acc. at 500 | mask ratio (last 500) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(group(records), key=_order):
        rs = group(records)[key]
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {key[0]} | {key[1]} | {seeds} | {fmt([r['bal_acc_median'] for r in rs])}"
                     f" | {fmt([r['top1_median'] for r in rs])} | "
                     f"{fmt([r['bal_acc_final'] for r in rs])} | "
                     f"{fmt([r['tail_recall_final'] for r in rs])} | "
                     f"{fmt([r.get(f'bal_acc_at_{WARMUP_STEP}') for r in rs])} | "
                     f"{fmt([r.get('mask_ratio_last') for r in rs])} |")
    return lines


def paired_gains(records: list[dict], key: str) -> dict[tuple[str, str, str], list[float]]:
    """(setting, algorithm, recipe) -> per-seed ``key`` of algorithm+daso minus algorithm, for
    the seeds that have both runs."""
    by = {(r["setting"], r["method"], r.get("recipe"), r["seed"]): r for r in records}
    gains: dict[tuple[str, str, str], list[float]] = {}
    for (setting, method, recipe, seed), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        base = by.get((setting, method.removesuffix("+daso"), recipe, seed))
        if not method.endswith("+daso") or base is None:
            continue
        if r.get(key) is None or base.get(key) is None:
            continue
        gains.setdefault((setting, method.removesuffix("+daso"), recipe), []).append(
            r[key] - base[key])
    return gains


GAIN_COLUMNS = [("bal_acc_median", "bal. acc. (median)"), ("tail_recall_final", "tail recall (final)"),
                (f"bal_acc_at_{WARMUP_STEP}", f"bal. acc. at {WARMUP_STEP}")]


def gains_table(records: list[dict]) -> list[str]:
    """+DASO minus the same algorithm, paired by seed: mean ± std and how many seeds gain."""
    per_column = {key: paired_gains(records, key) for key, _ in GAIN_COLUMNS}
    keys = sorted(per_column["bal_acc_median"],
                  key=lambda k: (SETTING_ORDER.index(k[0]) if k[0] in SETTING_ORDER else -1, k))
    if not keys:
        return []
    lines = ["| setting | algorithm | seeds | " + " | ".join(
        f"Δ {title} | seeds with Δ > 0" for _, title in GAIN_COLUMNS) + " |",
             "|---|---|---|" + "---|---|" * len(GAIN_COLUMNS)]
    for key in keys:
        setting, algo, recipe = key
        shown = algo if recipe in (None, "daso_official") else f"{algo} [{recipe}]"
        cells = []
        for column, _ in GAIN_COLUMNS:
            deltas = per_column[column].get(key, [])
            cells += [fmt(deltas), f"{sum(d > 0 for d in deltas)} of {len(deltas)}"]
        lines.append(f"| {setting} | {shown} | {len(per_column['bal_acc_median'][key])} | "
                     + " | ".join(cells) + " |")
    return lines


def per_class_table(records: list[dict], field: str) -> list[str]:
    """Mean over seeds of a per-class list field, one row per (setting, method)."""
    k = max((len(r.get(field) or []) for r in records), default=0)
    if not k:
        return []
    lines = ["| setting | method | " + " | ".join(str(c) for c in range(k)) + " |",
             "|---|---|" + "---|" * k]
    for key in sorted(group(records), key=_order):
        rs = [r for r in group(records)[key] if r.get(field)]
        if not rs:
            continue
        cells = []
        for c in range(k):
            vals = [r[field][c] for r in rs if c < len(r[field]) and r[field][c] is not None]
            cells.append(f"{statistics.fmean(vals) * 100:.0f}" if vals else "–")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def runs_table(records: list[dict]) -> list[str]:
    lines = ["| run | experiment | recipe | seed | commit | iterations |",
             "|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["run"]):
        lines.append(f"| {r['run']} | {r['experiment']} | {r.get('recipe')} | {r['seed']} | "
                     f"{(r['commit'] or '?')[:10]} | {r['iterations']} |")
    return lines


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render_markdown(records: list[dict], missing: list[Job], sources: list[Path] | None = None,
                    argv: list[str] | None = None) -> str:
    sources = sources or [ROOT / "analysis/results/cifar10_lt_mini_runs"]
    command = " ".join(["python analysis/benchmark_cifar_mini.py",
                        *[a if not a.startswith("/") else _shown(Path(a)) for a in argv or []]])
    out = ["# CIFAR-10-LT mini protocol (2 CPU cores)", "",
           f"Produced by `{command}` from the run folders in "
           f"{', '.join(f'`{_shown(d)}/`' for d in sources)}; do not edit by hand. "
           "Each row's recipe is in brackets when it is not the row's own "
           "(`daso_official`).", "",
           "Protocol (docs/experiments.md, configs/experiment/mini/): CIFAR-10-LT, gamma_l = 100, "
           "N1 = 1500, M1 = 3000; unlabeled consistent (gamma_u = 100), uniform (gamma_u = 1) or "
           "reversed; WRN-16-1, 2000 iterations, labeled batch 32, mu 2, SGD lr 0.03, official "
           "DASO recipe (recipe=daso_official); DASO warm-up 500, m_hat window 50. Test set: "
           "the 10,000 CIFAR-10 test images. Numbers are % of the EMA model, mean ± sample std "
           "over seeds; 'median' is the median of the last 5 evaluations (every 100 "
           "iterations), 'final' the evaluation after the last step. Tail recall: mean test "
           "recall of the 3 classes with the fewest labels (7, 8, 9). 'bal. acc. at 500': the "
           "evaluation at the end of DASO's warm-up, before DASO changes any pseudo-label (a "
           "gap there comes from the EMA model's train-mode forward of the labeled batch that "
           "fills DASO's queues, not from DASO's pseudo-labels). 'mask ratio': share of "
           "unlabeled images above the threshold over the last 500 iterations. This is a CPU-sized "
           "scale (0.8% of the paper's 250k iterations, a 16x smaller network): it is not "
           "comparable with the paper's numbers.", ""]
    out += main_table(records) + [""]
    gains = gains_table(records)
    if gains:
        out += ["## DASO minus the same algorithm without it, paired by seed (points)", "",
                "Each seed's +DASO run minus the run without DASO on the same split and seed; "
                "mean ± sample std over those differences.", ""] + gains + [""]
    for field, title in [("test_recall", "Test recall per class (final), %")] + [
            (f"pseudo_{k}_{m}", f"Pseudo-label {m} per class, {k} (last 100 iterations), %")
            for k in PSEUDO_KINDS for m in ("recall", "precision")]:
        table = per_class_table(records, field)
        if table:
            out += [f"## {title}", ""] + table + [""]
    out += ["## Runs", ""] + runs_table(records) + [""]
    if missing:
        out += ["## Not run yet", "", ", ".join(j.name for j in missing), ""]
    return "\n".join(out)


def write_outputs(records: list[dict], missing: list[Job], out: Path, stem: str,
                  sources: list[Path] | None = None, argv: list[str] | None = None) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(render_markdown(records, missing, sources, argv))
    (out / f"{stem}_runs.json").write_text(json.dumps(records, indent=1) + "\n")
    flat = [k for k in records[0] if not isinstance(records[0][k], list)] if records else []
    with open(out / f"{stem}_runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(flat + ["tail_classes"])
        for r in records:
            w.writerow([r[k] for k in flat] + [" ".join(map(str, r["tail_classes"]))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "analysis/results/cifar10_lt_mini_runs")
    p.add_argument("--compare-runs", type=Path, action="append", default=[], metavar="DIR",
                   help="more run folders for the tables only (e.g. another recipe's runs)")
    p.add_argument("--out", type=Path, default=ROOT / "analysis/results")
    p.add_argument("--stem", default="cifar10_lt_mini")
    p.add_argument("--aggregate", action="store_true", help="tables only, train nothing")
    p.add_argument("--list", action="store_true", help="print the matrix with each run's state")
    p.add_argument("--max-runs", type=int, default=None, help="train at most this many runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run (e.g. trainer.iterations=20 for a smoke)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="restrict the matrix to jobs whose name contains NAME (repeatable)")
    args = p.parse_args(argv)
    jobs = select_jobs(matrix(), args.only)
    if args.list:
        for j in jobs:
            print(f"{run_state(args.runs / j.name):10s} {j.name}")
        return 0
    if not args.aggregate:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        run_matrix(jobs, args.runs, args.max_runs, args.set)
    records = read_records(args.runs)
    for extra in args.compare_runs:
        records += read_records(extra)
    missing = [j for j in jobs if run_state(args.runs / j.name) != "finished"]
    write_outputs(records, missing, args.out, args.stem, [args.runs, *args.compare_runs],
                  sys.argv[1:] if argv is None else argv)
    print(f"{len(records)} finished runs -> {args.out / (args.stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
