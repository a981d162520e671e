"""Issue 12: the MixMatch paper's ablation (Table 4) on digits-LT, several seeds, beside the
paper's CIFAR-10 values.

    python analysis/mixmatch_ablation_digits.py                      # 10 rows x 3 seeds
                      # (resumable: finished <row>-seed<k> folders in --out-runs are kept)
    python analysis/mixmatch_ablation_digits.py --seeds 0 --iterations 100 --out /tmp/ab  # smoke
    python analysis/mixmatch_ablation_digits.py --from-runs DIR [DIR ...]  # table only, from
                                                     # the finished <row>-seed<k> run folders

Every row is ``algorithm=mixmatch`` with one switch of its experiment file
(configs/experiment/_generate_mixmatch_ablation.py ROWS) on the digits-LT setting and budget
of analysis/benchmark_digits.py (which trains each run through the real ``Trainer``; its
``run_one`` is reused here). The table is computed from the run folders' per_class.csv.
Outputs in ``--out`` (default analysis/results): ``mixmatch_ablation_digits.md`` and the raw
records ``mixmatch_ablation_digits_runs.{csv,json}``.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))
import benchmark_digits as bench  # noqa: E402  (the digits harness: run_one, git_commit)

NAME = "mixmatch_ablation_digits"
# MixMatch (Berthelot et al., NeurIPS 2019) Table 4: error rate (%) on CIFAR-10 with 250 and
# 4000 labels, one run each (official runs/table4.sh: split seed 3).
PAPER_TABLE4 = {
    "full": (11.80, 6.00), "k1": (17.09, 8.06), "k3": (11.55, 6.23), "k4": (12.45, 5.88),
    "t1": (27.83, 10.59), "param_ema": (11.86, 6.47), "no_mixup": (39.11, 10.97),
    "mixup_labeled": (32.16, 9.22), "mixup_unlabeled": (12.35, 6.83),
    "mixup_separate": (12.26, 6.50),
}


def ablation_rows() -> dict[str, tuple[str, dict[str, object]]]:
    """ROWS of configs/experiment/_generate_mixmatch_ablation.py: {row: (title, switches)}."""
    path = ROOT / "configs" / "experiment" / "_generate_mixmatch_ablation.py"
    spec = importlib.util.spec_from_file_location("mixmatch_ablation_generate", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen.ROWS


def _hydra(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def job_overrides(args, row: str, switches: dict[str, object], seed: int) -> list[str]:
    return [*bench.common_overrides(args), "algorithm=mixmatch", "pseudo=none", f"seed={seed}",
            f"run_dir={Path(args.out_runs) / f'{row}-seed{seed}'}",
            *[f"algorithm.{k}={_hydra(v)}" for k, v in switches.items()]]


def ran_the_row(rows: dict):
    """A check for ``bench.records_from_runs``: the folder's config has the row's switches."""
    from omegaconf import OmegaConf

    def check(run_dir: Path, row: str) -> None:
        algo = OmegaConf.load(run_dir / "config.yaml").algorithm
        for key, value in rows[row][1].items():
            if algo[key] != value:
                raise ValueError(f"{run_dir}: algorithm.{key}={algo[key]}, row {row} needs {value}")
    return check


def records_from_runs(dirs: list[str], rows: dict) -> list[dict]:
    """Finished run folders under dirs, one record per (row, seed) (the first one found)."""
    return bench.records_from_runs(dirs, rows, check=ran_the_row(rows))


def error_cell(values: list[float]) -> str:
    """Error rate 100 - accuracy, mean ± sample std over seeds, in %."""
    errs = [100.0 * (1.0 - v) for v in values]
    spread = f"{statistics.stdev(errs):.2f}" if len(errs) > 1 else "–"  # one seed: no spread
    return f"{statistics.fmean(errs):.2f} ± {spread}"


def mean_error(values: list[float]) -> float:
    return 100.0 * (1.0 - statistics.fmean(values))


def table(records: list[dict], rows: dict) -> str:
    def vals(row: str, key: str) -> list[float]:
        return [r[key] for r in records if r["method"] == row]

    full = mean_error(vals("full", "bal_acc_median")) if vals("full", "bal_acc_median") else None
    lines = ["| row | Table 4 ablation | digits-LT error (median) | Δ vs MixMatch | "
             "digits-LT error (final EMA) | tail error (median) | paper 250 labels | Δ | "
             "paper 4000 labels | Δ |", "| --- |" + " --- |" * 9]
    p_full = PAPER_TABLE4["full"]
    for row, (title, _) in rows.items():
        med = vals(row, "bal_acc_median")
        if not med:
            continue
        d = "-" if row == "full" or full is None else f"{mean_error(med) - full:+.2f}"
        p250, p4000 = PAPER_TABLE4[row]
        pd250 = "-" if row == "full" else f"{p250 - p_full[0]:+.2f}"
        pd4000 = "-" if row == "full" else f"{p4000 - p_full[1]:+.2f}"
        lines.append(f"| `{row}` | {title} | {error_cell(med)} | {d} "
                     f"| {error_cell(vals(row, 'bal_acc_final'))} "
                     f"| {error_cell(vals(row, 'tail_recall_median'))} "
                     f"| {p250:.2f} | {pd250} | {p4000:.2f} | {pd4000} |")
    return "\n".join(lines)


def report(args, records: list[dict], rows: dict, wall: float | None) -> str:
    r0 = records[0]
    seeds = sorted({r["seed"] for r in records})
    per_row = {row: sorted(r["seed"] for r in records if r["method"] == row) for row in rows}
    if wall is None:  # --from-runs
        source = (f"from the finished run folders in {', '.join(args.from_runs)} "
                  f"(commit {bench.git_commit()} of the script; {len(records)} runs)")
    else:
        source = (f"(commit {bench.git_commit()}, {len(records)} runs, {wall / 60:.1f} min "
                  f"wall time, {args.workers} worker(s) x {args.threads} torch thread(s), CPU)")
    missing = [f"`{row}` ({', '.join(map(str, s)) or 'none'})" for row, s in per_row.items()
               if s != seeds]
    note = ("" if not missing else "\n**Incomplete rows** (seeds present): "
            + ", ".join(missing) + ".\n")
    return f"""# MixMatch ablation (paper Table 4) on digits-LT: {args.iterations} iterations

Generated by `python analysis/mixmatch_ablation_digits.py {' '.join(sys.argv[1:])}`
{source}.
{note}
**The scale differs: do not read the two sides as the same experiment.** Left: digits-LT
(scikit-learn 8x8 digits, long-tailed: labeled {r0['labeled_counts']}, unlabeled
[90, ..., 9], gamma = 10; test 50 per class), `model=small_cnn`, SGD lr 0.03,
{args.iterations} iterations, labeled batch {args.batch_size}, seeds
{', '.join(map(str, seeds))}; cells are mean ± sample std over the seeds of the error
rate 100 - balanced accuracy (%), *median* = median of the last {args.summary_last}
evaluations (every {args.eval_interval} iterations), *final* = the last evaluation, *tail* =
the {bench.TAIL_SIZE} classes with the fewest labels (digits {', '.join(map(str, r0['tail_classes']))}).
Right: the MixMatch paper's Table 4 (Berthelot et al., NeurIPS 2019), CIFAR-10, balanced,
250 / 4000 labels, WRN-28-2, Adam, 2^20 iterations, one run per row: error rate (%) as
printed. Δ = the row minus full MixMatch on the same side. Each row changes one switch of
`algorithm=mixmatch` (MixMatch defaults otherwise: K = 2, T = 0.5, alpha = 0.75,
lambda_U = 75); the switches are those of `configs/experiment/mixmatch_ablation_<row>_<labels>.yaml`.
The paper's ICT row is a different method and is not run.

{table(records, rows)}

Raw per-run records: `{NAME}_runs.csv` / `{NAME}_runs.json`.
"""


def parse_args(argv: list[str] | None):
    p = bench.budget_parser(__doc__)
    p.add_argument("--rows", nargs="+", default=None, help="a subset of the rows")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=str(ROOT / "analysis" / "results"))
    p.add_argument("--out-runs", default=os.path.join(tempfile.gettempdir(),
                                                      "imbssl_mixmatch_ablation_runs"))
    p.add_argument("--from-runs", nargs="+", default=None, metavar="DIR",
                   help="train nothing: build the table from finished run folders in DIR")
    return p.parse_args(argv)


def write(args, records: list[dict], rows: dict, wall: float | None) -> Path:
    """The table and raw records under args.out."""
    order = {r: i for i, r in enumerate(rows)}
    records.sort(key=lambda r: (order[r["method"]], r["seed"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}_runs.json").write_text(json.dumps(records, indent=1) + "\n")
    cols = ["method", "seed", "bal_acc_median", "bal_acc_final", "tail_recall_median",
            "tail_recall_final", "evaluations", "seconds"]
    lines = [",".join(cols)] + [",".join(f"{r[c]:.4f}" if isinstance(r[c], float) and
                                         c != "seconds" else str(r[c]) for c in cols)
                                for r in records]
    (out / f"{NAME}_runs.csv").write_text("\n".join(lines) + "\n")
    (out / f"{NAME}.md").write_text(report(args, records, rows, wall))
    print(table(records, rows))
    return out / f"{NAME}.md"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = ablation_rows()
    if args.rows:
        rows = {r: rows[r] for r in args.rows}
    if args.from_runs:
        records = records_from_runs(args.from_runs, rows)
        if not records:
            print(f"no finished run folders in {args.from_runs}", file=sys.stderr)
            return 1
        t = records[0]["trainer"]  # the budget the runs were trained with
        args.iterations, args.batch_size = t["iterations"], t["batch_size"]
        args.eval_interval, args.summary_last = t["eval_interval"], t["summary_last"]
        print(f"wrote {write(args, records, rows, None)}")
        return 0
    done = {(r["method"], r["seed"]): r for r in records_from_runs([args.out_runs], rows)}
    jobs = [(row, s, job_overrides(args, row, sw, s), args.threads)
            for s in args.seeds for row, (_, sw) in rows.items() if (row, s) not in done]
    print(f"{len(done)} finished run folders kept in {args.out_runs}, {len(jobs)} to train")
    start, records = time.perf_counter(), list(done.values())
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=4) as pool:
        for rec in pool.imap_unordered(bench.run_one, jobs):
            records.append(rec)
            bench._progress(rec, len(records), len(jobs) + len(done), start)
    wall = time.perf_counter() - start
    print(f"wrote {write(args, records, rows, wall)} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
