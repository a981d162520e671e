"""Issue 4/5 benchmark on digits-LT: supervised vs FixMatch, MixMatch, ReMixMatch, SimMatch,
each SSL algorithm with and without DASO, over several seeds at one fixed budget.

    source /work/venv/bin/activate
    python analysis/benchmark_digits.py                       # full benchmark (~10-15 min)
    python analysis/benchmark_digits.py --seeds 0 --iterations 300 --out /tmp/bench  # smoke

Every run goes through the real ``Trainer`` in-process (``imbssl train`` composes the same
config): same iterations, labeled batch size, optimizer and evaluation schedule for every
method; only the algorithm (and ``pseudo``) differ, plus the documented per-method overrides
in ``METHOD_OVERRIDES``. Reported per method, mean ± sample std (ddof=1) over seeds, in %:

* balanced accuracy on the test set (50 images per class, so balanced accuracy = top-1),
* tail recall: mean test recall over the 3 classes with the fewest labeled images
  (digits 7, 8, 9: 5, 3 and 3 labels),

each under two statistics of the EMA model's evaluations: ``median`` = DASO's protocol, the
median of the last ``--summary-last`` evaluations (with ``--eval-interval`` 10 and 20
evaluations: the last 200 iterations), and ``final`` = the evaluation after the last step.

Outputs in ``--out`` (default analysis/results): ``digits_benchmark.md`` (tables),
``digits_benchmark_runs.csv`` and ``digits_benchmark_runs.json`` (one record per run, with
the per-class recall at the end). Run folders go to ``--out-runs`` (default under /tmp).
Torch uses one thread per worker process (``--threads``): on a small shared CPU two threads
per process are *much* slower than one.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["supervised", "fixmatch", "mixmatch", "remixmatch", "simmatch"]
SSL = ALGORITHMS[1:]
TAIL_SIZE = 3

# Per-method overrides beyond the algorithm's own config (documented in the report).
METHOD_OVERRIDES: dict[str, list[str]] = {
    # The official ReMixMatch+DASO config (configs/*/remixmatch_daso.yaml) turns ReMixMatch's
    # distribution alignment off (MODEL.DIST_ALIGN.APPLY: False); DASO replaces it.
    "remixmatch+daso": ["algorithm.dist_align=none"],
}


def run_label(algo: str, daso: bool) -> str:
    return f"{algo}+daso" if daso else algo


def common_overrides(args) -> list[str]:
    return [
        f"trainer.iterations={args.iterations}", f"trainer.batch_size={args.batch_size}",
        f"trainer.eval_interval={args.eval_interval}", f"trainer.summary_last={args.summary_last}",
        f"trainer.log_interval={args.eval_interval}", "trainer.checkpoint_interval=0",
        "trainer.progress=false", "trainer.report=false", "trainer.tensorboard=false",
        "device=cpu", "overwrite=true", *args.override,
    ]


def job_overrides(args, method: str, seed: int) -> list[str]:
    algo, _, pseudo = method.partition("+")
    return [*common_overrides(args), f"algorithm={algo}",
            f"pseudo={args.daso_config if pseudo == 'daso' else 'none'}", f"seed={seed}",
            f"run_dir={Path(args.out_runs) / f'{method}-seed{seed}'}",
            *METHOD_OVERRIDES.get(method, [])]


def tail_classes(labeled_counts: list[int], k: int = TAIL_SIZE) -> list[int]:
    """The k classes with the fewest labeled images (ties: the later class first)."""
    order = sorted(range(len(labeled_counts)), key=lambda c: (labeled_counts[c], -c))
    return sorted(order[:k])


def read_test_recalls(run_dir: Path, num_classes: int) -> list[tuple[int, list[float]]]:
    """(step, per-class test recall) of every evaluation, from the run folder's per_class.csv."""
    from imbssl.diagnostics.logfile import read_per_class

    df = read_per_class(run_dir)
    df = df[(df["source"] == "test") & (df["kind"] == "prediction") & (df["subset"] == "all")
            & (df["metric"] == "recall")]
    table = df.pivot_table(index="step", columns="class", values="value", aggfunc="last")
    table = table.reindex(columns=range(num_classes))
    return [(int(step), [float(v) for v in row]) for step, row in table.iterrows()]


def run_one(job: tuple[str, int, list[str], int]) -> dict:
    """Train one run in this process; return its record."""
    method, seed, overrides, threads = job
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from imbssl.cli import compose
    from imbssl.diagnostics.metrics import median_of_last
    from imbssl.engine.trainer import Trainer

    cfg = compose(overrides)
    trainer = Trainer(cfg)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = trainer.run()
    seconds = time.perf_counter() - start
    recalls = read_test_recalls(trainer.run_dir, trainer.data.num_classes)

    tail = tail_classes(trainer.data.labeled_counts)
    tail_hist = [float(np.mean([r[c] for c in tail])) for _, r in recalls]
    bal_hist = [float(np.mean(r)) for _, r in recalls]
    n = trainer.tcfg.summary_last
    record = {
        "method": method, "algorithm": method.partition("+")[0],
        "daso": method.endswith("+daso"), "seed": seed,
        "bal_acc_median": summary[f"median_last{n}"]["test/balanced_acc"],
        "bal_acc_final": summary["final"]["test/balanced_acc"],
        "tail_recall_median": median_of_last(tail_hist, n),
        "tail_recall_final": tail_hist[-1],
        "top1_final": summary["final"]["test/top1"],
        "evaluations": len(bal_hist), "summary_last": n, "tail_classes": tail,
        "final_step": recalls[-1][0], "final_recall": recalls[-1][1],
        "labeled_counts": list(trainer.data.labeled_counts),
        "seconds": round(seconds, 1), "overrides": overrides,
        "run_dir": str(trainer.run_dir),
    }
    # the per-class recalls of the run folder reproduce the trainer's own summary
    assert math.isclose(bal_hist[-1], record["bal_acc_final"], abs_tol=1e-9)
    assert math.isclose(median_of_last(bal_hist, n), record["bal_acc_median"], abs_tol=1e-9)
    return record


def record_from_run_dir(run_dir: Path, labels, check=None) -> dict | None:
    """The record of a finished ``<label>-seed<k>`` run folder whose label is in ``labels``,
    rebuilt from its summary.json, meta.json and per_class.csv; None otherwise.
    ``check(run_dir, label)`` may raise when the folder did not run what its label says."""
    import numpy as np

    from imbssl.diagnostics.metrics import median_of_last

    label, _, seed = run_dir.name.rpartition("-seed")
    summary_path = run_dir / "summary.json"
    if label not in labels or not seed.isdigit() or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "finished":
        return None
    if check is not None:
        check(run_dir, label)
    meta = json.loads((run_dir / "meta.json").read_text())
    counts = meta["labeled_counts"]
    recalls = read_test_recalls(run_dir, len(counts))
    tail = tail_classes(counts)
    tail_hist = [float(np.mean([r[c] for c in tail])) for _, r in recalls]
    n = int(summary["summary_last"])
    commit = meta.get("git_commit", "unknown") + ("+dirty" if meta.get("git_dirty") else "")
    return {"method": label, "seed": int(seed),
            "bal_acc_median": summary[f"median_last{n}"]["test/balanced_acc"],
            "bal_acc_final": summary["final"]["test/balanced_acc"],
            "tail_recall_median": median_of_last(tail_hist, n),
            "tail_recall_final": tail_hist[-1], "evaluations": len(recalls),
            "summary_last": n, "tail_classes": tail, "labeled_counts": counts,
            "final_step": recalls[-1][0], "commit": commit, "trainer": meta["trainer"],
            "seconds": float("nan"), "run_dir": str(run_dir)}


def records_from_runs(dirs, labels, check=None) -> list[dict]:
    """Finished run folders under ``dirs``: one record per (label, seed), the first found."""
    found: dict[tuple[str, int], dict] = {}
    for d in map(Path, dirs):
        for run_dir in sorted(d.iterdir()) if d.is_dir() else ():
            rec = record_from_run_dir(run_dir, labels, check) if run_dir.is_dir() else None
            if rec is not None:
                found.setdefault((rec["method"], rec["seed"]), rec)
    return list(found.values())


# ----------------------------------------------------------------------- aggregation
def mean_std(values: list[float]) -> tuple[float, float]:
    values = [100.0 * v for v in values]
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def delta(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "-"
    d = 100.0 * (statistics.fmean(b) - statistics.fmean(a))
    return f"{d:+.2f}"


def values(records: list[dict], method: str, key: str) -> list[float]:
    return [r[key] for r in records if r["method"] == method]


def tables(records: list[dict], methods: list[str]) -> str:
    lines = []
    sup = "supervised"
    lines += ["### Table 1: all methods (balanced accuracy and tail recall, %)", "",
              "| method | bal. acc. (median) | bal. acc. (final EMA) | tail recall (median) "
              "| tail recall (final EMA) | Δ bal. acc. vs supervised (median) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        lines.append(
            f"| {m} | {cell(values(records, m, 'bal_acc_median'))} "
            f"| {cell(values(records, m, 'bal_acc_final'))} "
            f"| {cell(values(records, m, 'tail_recall_median'))} "
            f"| {cell(values(records, m, 'tail_recall_final'))} "
            f"| {delta(values(records, sup, 'bal_acc_median'), values(records, m, 'bal_acc_median')) if m != sup else '-'} |")
    lines.append("")
    pairs = [a for a in SSL if a in methods and f"{a}+daso" in methods]
    for stat, title in (("median", "median of the last evaluations (DASO protocol)"),
                        ("final", "final EMA evaluation")):
        lines += [f"### Table 2{'a' if stat == 'median' else 'b'}: with vs without DASO, "
                  f"{title} (%)", "",
                  "| algorithm | bal. acc. | bal. acc. +DASO | Δ | tail recall "
                  "| tail recall +DASO | Δ |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for a in pairs:
            b_key, t_key = f"bal_acc_{stat}", f"tail_recall_{stat}"
            lines.append(
                f"| {a} | {cell(values(records, a, b_key))} "
                f"| {cell(values(records, a + '+daso', b_key))} "
                f"| {delta(values(records, a, b_key), values(records, a + '+daso', b_key))} "
                f"| {cell(values(records, a, t_key))} "
                f"| {cell(values(records, a + '+daso', t_key))} "
                f"| {delta(values(records, a, t_key), values(records, a + '+daso', t_key))} |")
        lines.append("")
    return "\n".join(lines)


def per_seed_table(records: list[dict], methods: list[str], seeds: list[int]) -> str:
    head = " | ".join(f"seed {s} median / final" for s in seeds)
    lines = ["| method | " + head + " |", "| --- |" + " --- |" * len(seeds)]
    for m in methods:
        cells = []
        for s in seeds:
            r = [x for x in records if x["method"] == m and x["seed"] == s]
            cells.append(f"{100 * r[0]['bal_acc_median']:.1f} / {100 * r[0]['bal_acc_final']:.1f}"
                         if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args, records: list[dict], methods: list[str], wall: float) -> str:
    r0 = records[0]
    tail = ", ".join(str(c) for c in r0["tail_classes"])
    counts = r0["labeled_counts"]
    n_evals = r0["evaluations"]
    if n_evals <= args.summary_last:
        window = (f"here all {n_evals} evaluations, from iteration {args.eval_interval}: "
                  "the median then includes the early transient")
    else:
        window = f"here the last {args.summary_last * args.eval_interval} iterations"
    extra = "\n".join(f"  * `{m}`: `{' '.join(o)}`" for m, o in METHOD_OVERRIDES.items()
                      if m in methods) or "  * none"
    user = " ".join(args.override) or "none"
    return f"""# digits-LT benchmark (issues 4 and 5): {args.iterations} iterations

Generated by `python analysis/benchmark_digits.py {' '.join(sys.argv[1:])}`
(commit {git_commit()}, {len(records)} runs, {wall / 60:.1f} min wall time,
{args.workers} worker(s) x {args.threads} torch thread(s), CPU).

**Setting.** scikit-learn digits 8x8, long-tailed: labeled {counts}, unlabeled
[90, ..., 9] (gamma_l = gamma_u = 10), test 50 per class. `model=small_cnn` (EMA decay 0.99),
SGD lr 0.03 constant (DASO protocol). Every method: {args.iterations} iterations,
labeled batch {args.batch_size} (unlabeled batch = labeled batch x the algorithm's `uratio`,
its paper/DASO default), seeds {', '.join(map(str, args.seeds))}. DASO = `pseudo={args.daso_config}`.
Extra overrides for every run: {user}. Per-method overrides:
{extra}

**Statistics.** All evaluations use the EMA model on the test set every {args.eval_interval}
iterations. *median* = median of the last {args.summary_last} evaluations (the DASO
protocol; {window}); *final* = the evaluation after the last
iteration. Cells: mean ± sample std (ddof=1) over the seeds, in %. Balanced accuracy = mean
per-class recall (equal to top-1 here: the test set is balanced). *Tail recall* = mean test
recall over the {TAIL_SIZE} classes with the fewest labeled images: digits {tail}. Δ columns:
difference of the means.

{tables(records, methods)}
### Per seed: balanced accuracy, median / final (%)

{per_seed_table(records, methods, args.seeds)}

Raw per-run records: `{args.name}_runs.csv` / `{args.name}_runs.json`. Findings and
diagnostics (why an algorithm does or does not beat the supervised baseline):
`digits_benchmark_notes.md`.
"""


def write_outputs(args, records: list[dict], methods: list[str], wall: float) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}_runs.json").write_text(json.dumps(records, indent=1) + "\n")
    cols = ["method", "algorithm", "daso", "seed", "bal_acc_median", "bal_acc_final",
            "tail_recall_median", "tail_recall_final", "top1_final", "evaluations",
            "summary_last", "seconds"]
    rows = [",".join(cols)]
    for r in records:
        rows.append(",".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c != "seconds"
                             else str(r[c]) for c in cols))
    (out / f"{args.name}_runs.csv").write_text("\n".join(rows) + "\n")
    md = out / f"{args.name}.md"
    md.write_text(report(args, records, methods, wall))
    return md


def budget_parser(doc: str) -> argparse.ArgumentParser:
    """The options every digits-LT benchmark shares: budget, evaluation and seeds."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--summary-last", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return p


def parse_args(argv: list[str] | None):
    p = budget_parser(__doc__)
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    p.add_argument("--no-daso", action="store_true", help="skip the +DASO runs")
    p.add_argument("--daso-config", default="daso_quick", help="pseudo=... for the +DASO runs")
    p.add_argument("--override", nargs="*", default=[],
                   help="extra Hydra overrides applied to every run")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    p.add_argument("--name", default="digits_benchmark",
                   help="output file stem: NAME.md, NAME_runs.csv, NAME_runs.json")
    p.add_argument("--out-runs", default=os.path.join(tempfile.gettempdir(),
                                                      "imbssl_digits_benchmark_runs"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = list(args.algorithms)
    if not args.no_daso:
        methods += [f"{a}+daso" for a in args.algorithms if a in SSL]
    jobs = [(m, s, job_overrides(args, m, s), args.threads) for s in args.seeds for m in methods]
    start = time.perf_counter()
    records = []
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=4) as pool:
            for rec in pool.imap_unordered(run_one, jobs):
                records.append(rec)
                _progress(rec, len(records), len(jobs), start)
    else:
        for job in jobs:
            rec = run_one(job)
            records.append(rec)
            _progress(rec, len(records), len(jobs), start)
    wall = time.perf_counter() - start
    order = {m: i for i, m in enumerate(methods)}
    records.sort(key=lambda r: (order[r["method"]], r["seed"]))
    md = write_outputs(args, records, methods, wall)
    print(tables(records, methods))
    print(f"wrote {md} and the raw runs beside it ({wall / 60:.1f} min)")
    return 0


def _progress(rec: dict, done: int, total: int, start: float) -> None:
    print(f"[{done}/{total} {time.perf_counter() - start:6.0f}s] {rec['method']:<16} "
          f"seed {rec['seed']}: bal.acc median {100 * rec['bal_acc_median']:.2f} "
          f"final {100 * rec['bal_acc_final']:.2f}  tail median "
          f"{100 * rec['tail_recall_median']:.2f} ({rec['seconds']:.0f}s)",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
