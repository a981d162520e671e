"""Issue 19: every comparator of the DASO paper's tables, with and without DASO, on digits-LT,
several seeds, each row beside the DASO paper's reported CIFAR-10-LT value for orientation.

    python analysis/comparators_digits.py                 # every row x 3 seeds (resumable)
    python analysis/comparators_digits.py --rows fixmatch fixmatch+la --seeds 0   # a subset
    python analysis/comparators_digits.py --from-runs DIR # table only, from the run folders
    python analysis/comparators_digits.py --list          # the rows and their overrides
    python analysis/comparators_digits.py --rows acr acr+daso --keep-records analysis/results/comparators_digits_runs.json
                                  # re-train only these rows; the others from the kept records

Every row trains through the real ``Trainer`` (``analysis/benchmark_digits.py``'s ``run_one``)
at the digits-LT budget of that script; a row is ``algorithm=...`` plus its overrides
(``ROWS``). Finished ``<row>-seed<k>`` folders in ``--out-runs`` are kept, so a stopped
batch continues. A row that starts from another row's finished run (cRT) names it in
``after`` and runs once that run is finished. The table is computed from the run folders
alone (summary.json, meta.json, per_class.csv), plus, with ``--keep-records``, the records
of an earlier table for the (row, seed) pairs that have no run folder (rows whose method
changed must be re-trained: their old records would otherwise stay). Outputs in ``--out``
(default analysis/results): ``comparators_digits.md`` and ``comparators_digits_runs.{csv,json}``.

LA (inf) rows train nothing: as in the official code (``base_algorithm.py`` ``top1_la``), the
post-hoc logit-adjusted accuracy is a metric every run logs (``test/balanced_acc_posthoc_la``
in summary.json's final and median blocks); a row with ``reads`` takes it from the finished
runs of that base row (same seeds). Its tail recall is not logged per class: "–".
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))
import benchmark_digits as bench  # noqa: E402  (the digits harness: run_one, git_commit)

NAME = "comparators_digits"


@dataclass(frozen=True)
class Row:
    """One line of the table: a method (+DASO or not) as ``imbssl train`` overrides."""

    label: str
    overrides: tuple[str, ...]
    #: the published CIFAR-10-LT value for orientation: (where, value %), or None; from the
    #: DASO paper unless ``source`` names another (the method's own paper, or a later one)
    paper: tuple[str, float] | None = None
    #: a row whose finished run (same seed) this row starts from (``{after}`` in overrides)
    after: str | None = None
    #: a row whose runs this row is read from (their post-hoc LA metric): trains nothing
    reads: str | None = None
    notes: tuple[str, ...] = field(default=())
    #: the paper ``paper`` is read from, when it is not the DASO paper (e.g. "CCL, NeurIPS 2024")
    source: str | None = None


def _daso(*extra: str) -> tuple[str, ...]:
    return ("pseudo=daso_quick", *extra)


#: The rows in table order. ``paper``: the value the DASO paper (Oh et al., CVPR 2022) prints
#: for the same method on CIFAR-10-LT (gamma 100; the table and N1 named), read from the
#: paper's text (arXiv 2106.05682: Tables 1, 3, 11, 14, each value checked against it); "–"
#: where the paper has no such row (ACR; "+DASO" of Pseudo-Label, CReST, CReST+; cRT after
#: FixMatch).
#: Digits-LT schedules scaled to the 1000-iteration budget: ABC's 500 "epochs" -> 2 iterations
#: each; ACR's epoch -> 20 iterations; CReST 3 generations.
LA = "algorithm.logit_adjust=loss"
ABC = ("algorithm=abc", "algorithm.epoch_iters=2")
ACR = ("algorithm=acr", "algorithm.epoch_iters=20")
CCL = ("algorithm=ccl", "algorithm.epoch_iters=20", "algorithm.update_every=20")  # as ACR's
#: the official supervised solver (configs/cifar10/supervised.yaml, optim=sgd_multistep: lr 0.1,
#: x0.01 at 199999 and 225000 of 250k, 6250 warm-up steps), scaled to the run's length
SUPERVISED_SOLVER = ("optim=sgd_multistep", "optim.milestones={milestones}",
                     "optim.warmup_iters={warmup}")
CREST = ("algorithm.generations=3",)
#: ReMixMatch as CReST's learner, with ReMixMatch's own mu and lambda_u (official remixmatch_crest.yaml)
REMIXMATCH_IN_CREST = ("algorithm.base=remixmatch", "algorithm.uratio=1", "algorithm.lambda_u=1.5")
#: CDMAD on ReMixMatch with its official --lambda-u 2 and alignment (digits-LT: gamma_l = gamma_u)
REMIXMATCH_CDMAD = ("algorithm=cdmad", "algorithm.base=remixmatch", "algorithm.epoch_iters=3",
                    "algorithm.lambda_u=2.0", "algorithm.dist_align=labeled")
ROWS: list[Row] = [
    Row("supervised", ("algorithm=supervised", "pseudo=none", *SUPERVISED_SOLVER),
        ("Table 1, N1 500", 47.3)),
    Row("supervised+la", ("algorithm=supervised", "pseudo=none", LA, *SUPERVISED_SOLVER),
        ("Table 1, N1 500", 53.3)),
    Row("supervised+crt", ("algorithm=crt", "pseudo=none", "algorithm.init_from={after}"),
        ("Table 11, N1 500", 49.5), after="supervised"),
    Row("fixmatch", ("algorithm=fixmatch", "pseudo=none"), ("Table 1, N1 500", 67.8)),
    Row("fixmatch+daso", ("algorithm=fixmatch", *_daso()), ("Table 1, N1 500", 76.0)),
    Row("fixmatch+la", ("algorithm=fixmatch", "pseudo=none", LA), ("Table 1, N1 500", 75.3)),
    Row("fixmatch+la+daso", ("algorithm=fixmatch", LA, *_daso()), ("Table 1, N1 500", 77.9)),
    Row("fixmatch+lainf", (), ("Table 14, N1 1500", 82.8), reads="fixmatch"),
    Row("fixmatch+lainf+daso", (), ("Table 14, N1 1500", 84.5), reads="fixmatch+daso"),
    Row("fixmatch+darp", ("algorithm=fixmatch", "pseudo=darp"), ("Table 1, N1 500", 74.5)),
    Row("fixmatch+la+darp", ("algorithm=fixmatch", "pseudo=darp", LA), ("Table 1, N1 500", 76.6)),
    Row("fixmatch+crest", ("algorithm=crest", "pseudo=none", *CREST), ("Table 11, N1 500", 73.4)),
    Row("fixmatch+crest+daso", ("algorithm=crest", *CREST, *_daso())),
    Row("fixmatch+crest_plus", ("algorithm=crest_plus", "pseudo=none", *CREST),
        ("Table 1, N1 500", 76.3)),
    Row("fixmatch+crest_plus+daso", ("algorithm=crest_plus", *CREST, *_daso())),
    Row("fixmatch+crt", ("algorithm=crt", "pseudo=none", "algorithm.init_from={after}"),
        after="fixmatch"),
    Row("fixmatch+crt+daso", ("algorithm=crt", "pseudo=none", "algorithm.init_from={after}"),
        after="fixmatch+daso"),
    Row("fixmatch+abc", (*ABC, "pseudo=none"), ("Table 1, N1 500", 78.9)),
    Row("fixmatch+abc+daso", (*ABC, *_daso()), ("Table 1, N1 500", 80.1)),
    Row("acr", (*ACR, "pseudo=none")),
    Row("acr+daso", (*ACR, *_daso())),
    Row("ccl", (*CCL, "pseudo=none")), Row("ccl+daso", (*CCL, *_daso())),  # CCL, not in DASO
    Row("meanteacher", ("algorithm=meanteacher", "pseudo=none"), ("Table 3, N1 1500", 68.6)),
    Row("meanteacher+daso", ("algorithm=meanteacher", *_daso()), ("Table 3, N1 1500", 70.7)),
    Row("pseudolabel", ("algorithm=pseudolabel", "pseudo=none"), ("Table 11, N1 500", 47.8)),
    Row("pseudolabel+daso", ("algorithm=pseudolabel", *_daso())),
    # DASO Table 13 (ReMixMatch as the SSL learner, CIFAR-10-LT gamma 100, N1 500)
    Row("remixmatch", ("algorithm=remixmatch", "pseudo=none"), ("Table 13, N1 500", 70.9)),
    Row("remixmatch+daso", ("algorithm=remixmatch", *_daso()), ("Table 13, N1 500", 76.8)),
    Row("remixmatch+darp", ("algorithm=remixmatch", "pseudo=darp"), ("Table 13, N1 500", 72.2)),
    Row("remixmatch+crest_plus", ("algorithm=crest_plus", "pseudo=none", *CREST,
                                  *REMIXMATCH_IN_CREST), ("Table 13, N1 500", 75.6)),
    # USB's long-tailed methods (issue 29), not in the DASO paper: Adsh's and SAW's epochs ->
    # 20 iterations (as ACR's); DebiasPL's q_hat momentum 0.999 -> 0.99 (100 iterations)
    *[Row(f"{name}{'+daso' if daso else ''}", (*algo, *(_daso() if daso else ("pseudo=none",))))
      for name, algo in (("adsh", ("algorithm=adsh", "algorithm.epoch_iters=20")),
                         ("saw", ("algorithm=saw", "algorithm.epoch_iters=20")),
                         ("debiaspl", ("algorithm=debiaspl", "algorithm.qhat_momentum=0.99")))
      for daso in (False, True)],
    # TRAS (issue 29): its 500-iteration epoch -> 20 iterations (as ACR's): student from 220
    *[Row(f"tras{'+daso' if daso else ''}", ("algorithm=tras", "algorithm.epoch_iters=20",
                                             *(_daso() if daso else ("pseudo=none",))))
      for daso in (False, True)],
    # CoSSL (issue 29), not in the DASO paper: FixMatch for 80% of the run, then co-learning
    *[Row(f"cossl{'+daso' if daso else ''}", ("algorithm=cossl", *(_daso() if daso else (
        "pseudo=none",)))) for daso in (False, True)],
    *[Row(f"{b}+cossl{'+daso' if daso else ''}", ("algorithm=cossl", f"algorithm.base={b}",
                                                  *(_daso() if daso else ("pseudo=none",))))
      for b in ("remixmatch", "mixmatch") for daso in (False, True)],  # CoSSL's other bases
    # SimPro (issue 30, not in the DASO paper): its epoch (prior M-step period) -> 20 iterations
    Row("simpro", ("algorithm=simpro", "algorithm.epoch_iters=20", "pseudo=none")),
    Row("simpro+daso", ("algorithm=simpro", "algorithm.epoch_iters=20", *_daso())),
    # CDMAD (issue 30), not in the DASO paper: its 500 epochs -> 2 iterations each (as ABC's)
    *[Row(f"cdmad{'+daso' if daso else ''}", ("algorithm=cdmad", "algorithm.epoch_iters=2",
                                              *(_daso() if daso else ("pseudo=none",))))
      for daso in (False, True)],
    # CDMAD's ReMixMatch variant (official remixmatchcdmad.py): 300 epochs -> 3 iterations each
    *[Row(f"remixmatch+cdmad{'+daso' if daso else ''}", (*REMIXMATCH_CDMAD,
                                                         *(_daso() if daso else ("pseudo=none",))))
      for daso in (False, True)],
    # CPE (issue 30), not in the DASO paper: classwise BN on; its 1024-step epoch -> 20 iterations
    *[Row(f"cpe{d}", ("algorithm=cpe", "model.classwise_bn=3", "algorithm.epoch_iters=20",
                      *(_daso() if d else ("pseudo=none",)))) for d in ("", "+daso")],
]

#: Methods outside the DASO paper: a published value (CIFAR-10-LT, gamma 100, WRN-28-2),
#: read where docs/experiments.md's accuracy anchor table says: (where, value %, source). The
#: source is the method's own paper where its value could be read (its text, or its official
#: repository's copy of its table); for Adsh, SAW and DebiasPL, whose papers' texts are not
#: readable here, a later paper that ran them, named as such. TRAS: no CIFAR value was found.
OUTSIDE_DASO_PAPER = {
    "adsh": ("Table 2, N1 500", 73.0, "SEVAL (2024), its run in DASO's setting, not Adsh's paper"),
    "saw": ("Table 2, N1 500", 74.6, "SEVAL (2024), its run in DASO's setting, not SAW's paper"),
    "debiaspl": ("Table 1, N1 1500", 80.6,
                 "DyTrim (ICLR 2026), CDMAD's setting, not DebiasPL's paper"),
    "acr": ("N1 500", 81.6, "ACR, CVPR 2023 (reprinted in CCL's Table 2)"),
    "cossl": ("Table 1, N1 1500", 83.2, "CoSSL, CVPR 2022 (official README)"),
    "remixmatch+cossl": ("Table 1, N1 1500", 84.1, "CoSSL, CVPR 2022 (official README)"),
    "mixmatch+cossl": ("Table 1, N1 1500", 76.4, "CoSSL, CVPR 2022 (official README)"),
    "cpe": ("N1 500", 80.7, "CPE, AAAI 2024 (reprinted in CCL's Table 2; official logs 80.65)"),
    "ccl": ("Table 2, N1 500", 84.5, "CCL, NeurIPS 2024 (paper text)"),
    "simpro": ("Table 1, N1 500", 80.7,
               "SimPro, ICML 2024 (its Table 1 as typeset, an image in its repository)"),
    "cdmad": ("Table 1, N1 1500", 83.6, "CDMAD, CVPR 2024 (reprinted in DyTrim's Table 1)"),
    "remixmatch+cdmad": ("Table 1, N1 1500", 85.5,
                         "CDMAD, CVPR 2024 (a public results registry's transcription)"),
}
ROWS = [replace(r, paper=OUTSIDE_DASO_PAPER[r.label][:2], source=OUTSIDE_DASO_PAPER[r.label][2])
        if r.label in OUTSIDE_DASO_PAPER else r for r in ROWS]


def rows_by_label() -> dict[str, Row]:
    return {r.label: r for r in ROWS}


def run_dir_of(out_runs: Path, label: str, seed: int) -> Path:
    return Path(out_runs) / f"{label}-seed{seed}"


def job_overrides(args, row: Row, seed: int) -> list[str]:
    after = str(run_dir_of(args.out_runs, row.after, seed)) if row.after else ""
    # a row another row starts from (cRT) keeps its final checkpoint
    keep = [f"trainer.checkpoint_interval={args.iterations}"] if any(
        r.after == row.label for r in ROWS) else []
    # official supervised.yaml: STEPS (199999, 225000), WARMUP_ITERS 6250 of MAX_ITER 250000
    scaled = {"{after}": after, "{warmup}": str(6250 * args.iterations // 250000),
              "{milestones}": "[{},{}]".format(*(m * args.iterations // 250000
                                                  for m in (199999, 225000)))}

    def fill(override: str) -> str:
        for key, value in scaled.items():
            override = override.replace(key, value)
        return override

    return [*bench.common_overrides(args), f"seed={seed}",
            f"run_dir={run_dir_of(args.out_runs, row.label, seed)}", *keep,
            *[fill(o) for o in row.overrides]]


POSTHOC = "test/balanced_acc_posthoc_la"  # the post-hoc LA metric every run logs


def posthoc_record(base: dict, label: str) -> dict | None:
    """The LA (inf) record of row ``label`` from its base row's record (None when the base run
    did not log the post-hoc metric)."""
    summary_path = Path(base["run_dir"]) / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    n = int(summary.get("summary_last", base["summary_last"]))
    median = summary.get(f"median_last{n}", {}).get(POSTHOC)
    final = summary.get("final", {}).get(POSTHOC)
    if median is None or final is None:
        return None
    return {**base, "method": label, "bal_acc_median": median, "bal_acc_final": final,
            "tail_recall_median": float("nan"), "tail_recall_final": float("nan"),
            "read_from": base["method"]}


def records_from_runs(dirs: list[Path], rows: dict[str, Row]) -> list[dict]:
    """Finished ``<row>-seed<k>`` run folders under ``dirs``: one record per (row, seed);
    rows that ``read`` another row's runs get a record per base run that logged the metric."""
    trained = {label: row for label, row in rows.items() if row.reads is None}
    records = bench.records_from_runs(dirs, trained)
    for label, row in rows.items():
        if row.reads is not None:
            derived = (posthoc_record(r, label) for r in records if r["method"] == row.reads)
            records += [r for r in derived if r is not None]
    return records


def merge_kept(records: list[dict], kept_path: Path | None, rows: dict[str, Row],
               drop: tuple[str, ...] = ()) -> list[dict]:
    """``records`` plus the kept records (an earlier ``*_runs.json``) of trained rows that
    still exist, for the (row, seed) pairs ``records`` lacks; rows in ``drop`` (their method
    changed since) keep none."""
    if kept_path is None or not Path(kept_path).is_file():
        return records
    have = {(r["method"], r["seed"]) for r in records}
    kept = [r for r in json.loads(Path(kept_path).read_text())
            if r["method"] in rows and rows[r["method"]].reads is None
            and r["method"] not in drop and (r["method"], r["seed"]) not in have]
    return records + kept


# ----------------------------------------------------------------------------- table
def cell(values: list[float]) -> str:
    """Mean ± sample std over seeds, in %; '–' for the spread of a single seed."""
    values = [v for v in values if v == v]  # NaN: not logged (LA (inf) tail recall)
    if not values:
        return "–"
    pct = [100.0 * v for v in values]
    spread = f"{statistics.stdev(pct):.2f}" if len(pct) > 1 else "–"
    return f"{statistics.fmean(pct):.2f} ± {spread}"


def table(records: list[dict], rows: dict[str, Row]) -> str:
    def vals(label: str, key: str) -> list[float]:
        return [r[key] for r in records if r["method"] == label]

    lines = ["| method | seeds | digits-LT bal. acc. (median) | bal. acc. (final) "
             "| tail recall (median) | Δ bal. acc. vs. the same without DASO "
             "| published, CIFAR-10-LT (where) |", "| --- |" + " --- |" * 6]
    for label, row in rows.items():
        med = vals(label, "bal_acc_median")
        if not med:
            continue
        base = label[:-len("+daso")] if label.endswith("+daso") else None
        base_med = vals(base, "bal_acc_median") if base else []
        d = (f"{100 * (statistics.fmean(med) - statistics.fmean(base_med)):+.2f}"
             if base_med else "–")
        seeds = ",".join(str(r["seed"]) for r in sorted(
            (r for r in records if r["method"] == label), key=lambda r: r["seed"]))
        where = f"{row.source}: {row.paper[0]}" if row.paper and row.source else (
            row.paper[0] if row.paper else "")
        paper = f"{row.paper[1]} ({where})" if row.paper else "–"  # as published
        lines.append(f"| `{label}` | {seeds} | {cell(med)} | {cell(vals(label, 'bal_acc_final'))} "
                     f"| {cell(vals(label, 'tail_recall_median'))} | {d} | {paper} |")
    return "\n".join(lines)


def report(records: list[dict], rows: dict[str, Row], argv: list[str], note: str = "") -> str:
    r0 = records[0]
    t = r0["trainer"]
    commits = sorted({r["commit"] for r in records})
    overrides = "\n".join(
        f"- `{label}`: "
        + (f"no run of its own: `{POSTHOC}` of the `{row.reads}` runs (the post-hoc LA metric "
           "every run logs)" if row.reads else f"`{' '.join(row.overrides)}`")
        + (f" (starts from the finished `{row.after}` run of the same seed)" if row.after else "")
        for label, row in rows.items())
    return f"""# Comparators of the DASO paper's tables on digits-LT (issue 19)

Generated by `python analysis/comparators_digits.py {' '.join(argv)}` from {len(records)}
finished run folders (commits {', '.join(commits)}).

**The scale differs: do not read the two sides as the same experiment.** Left: digits-LT
(scikit-learn 8x8 digits, long-tailed: labeled {r0['labeled_counts']}, unlabeled
[90, ..., 9], gamma = 10; test 50 per class), `model=small_cnn`, SGD lr 0.03,
{t['iterations']} iterations, labeled batch {t['batch_size']}; cells are mean ± sample std over
the seeds of the balanced accuracy (%), *median* = median of the last {t['summary_last']}
evaluations (every {t['eval_interval']} iterations), *final* = the last evaluation, *tail* =
the 3 classes with the fewest labels (digits {', '.join(map(str, r0['tail_classes']))}).
Right: the value the DASO paper (Oh et al., CVPR 2022) prints for the same method on
CIFAR-10-LT with WRN-28-2 and 250k iterations or, where the cell names another paper, the
value that paper prints (its table and setting named; its own protocol): the method's own
paper where its value could be read, else a later paper that ran the method, which the cell
says. For orientation only; "–" where no paper has such a row.

{table(records, rows)}
{chr(10) + note + chr(10) if note else ""}
Each row's overrides (beyond the digits-LT budget of `analysis/benchmark_digits.py`):

{overrides}
"""


def write(out: Path, records: list[dict], rows: dict[str, Row], argv: list[str],
          note: str = "") -> Path:
    order = {label: i for i, label in enumerate(rows)}
    records.sort(key=lambda r: (order[r["method"]], r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}_runs.json").write_text(json.dumps(records, indent=1) + "\n")
    cols = ["method", "seed", "bal_acc_median", "bal_acc_final", "tail_recall_median",
            "tail_recall_final", "evaluations", "commit"]
    lines = [",".join(cols)] + [",".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                         for c in cols) for r in records]
    (out / f"{NAME}_runs.csv").write_text("\n".join(lines) + "\n")
    md = out / f"{NAME}.md"
    md.write_text(report(records, rows, argv, note))
    return md


# ----------------------------------------------------------------------------- running
def pending_jobs(args, rows: dict[str, Row], done: set[tuple[str, int]]) -> list[list]:
    """Waves of (label, seed, overrides, threads) jobs: a row with ``after`` waits for the
    wave that trains its base run."""
    waves: list[list] = [[], []]
    for seed in args.seeds:
        for label, row in rows.items():
            if (label, seed) in done or row.reads is not None:
                continue
            job = (label, seed, job_overrides(args, row, seed), args.threads)
            waves[1 if row.after else 0].append(job)
    return [w for w in waves if w]


def parse_args(argv: list[str] | None):
    p = bench.budget_parser(__doc__)
    p.add_argument("--rows", nargs="+", default=None, help="a subset of the rows (labels)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", type=Path, default=ROOT / "analysis" / "results")
    p.add_argument("--out-runs", type=Path, default=ROOT / "analysis" / "results" / "comparators_digits_runs")
    p.add_argument("--from-runs", nargs="+", type=Path, default=None, metavar="DIR",
                   help="train nothing: the table from the finished run folders in DIR")
    p.add_argument("--list", action="store_true", help="print the rows and their overrides")
    p.add_argument("--keep-records", type=Path, default=None, metavar="JSON",
                   help="an earlier *_runs.json: its records fill the (row, seed) pairs "
                        "without a run folder (re-train the rows whose method changed)")
    p.add_argument("--note", default="", help="a paragraph printed under the table")
    p.add_argument("--drop-kept", nargs="*", default=[], metavar="ROW",
                   help="rows whose kept records are stale (their method changed): none kept")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    all_rows = rows = rows_by_label()
    if args.rows:
        unknown = sorted(set(args.rows) - set(rows))
        if unknown:
            raise SystemExit(f"error: unknown rows {unknown}; see --list")
        needed = set(args.rows) | {rows[r].after for r in args.rows if rows[r].after}
        needed |= {rows[r].reads for r in args.rows if rows[r].reads}
        rows = {label: row for label, row in rows.items() if label in needed}
    if args.list:
        for label, row in rows.items():
            what = f"(reads {POSTHOC} of {row.reads})" if row.reads else " ".join(row.overrides)
            print(f"{label:28s} {what}")
        return 0
    if args.from_runs is None:
        done = {(r["method"], r["seed"]) for r in records_from_runs([args.out_runs], rows)}
        waves = pending_jobs(args, rows, done)
        total, start, finished = sum(map(len, waves)), time.perf_counter(), 0
        print(f"{len(done)} finished run folders kept in {args.out_runs}, {total} to train",
              flush=True)
        for wave in waves:
            with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=4) as pool:
                for rec in pool.imap_unordered(bench.run_one, wave):
                    finished += 1
                    bench._progress(rec, finished, total, start)
    records = merge_kept(records_from_runs(args.from_runs or [args.out_runs], all_rows),
                         args.keep_records, all_rows, tuple(args.drop_kept))
    if not records:
        print("no finished run folders", file=sys.stderr)
        return 1
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    shown += ["--note", "..."] if args.note else []
    print(f"wrote {write(args.out, records, all_rows, shown, args.note)}")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
