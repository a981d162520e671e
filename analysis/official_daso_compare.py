"""The comparison of issue 31, from the run folders of both codes (``python
analysis/official_daso.py`` calls ``write_comparison``): analysis/results/official_side_by_side.md
and its figure official_side_by_side.png.

Every number comes from imbssl's run-folder records (metrics.jsonl, per_class.csv,
summary.json, config.yaml; an official run's were converted by ``official_daso.convert_run``)
and from the queue's ``<run>.timing.jsonl`` lines (wall and CPU seconds of each attempt).
Only finished runs count; the others are listed with their last logged step.
"""
from __future__ import annotations

import calendar
import csv
import json
import math
import statistics
import time
from pathlib import Path

from official_daso import read_jsonl  # beside this file (analysis/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fixmatch", "fixmatch_daso")
METHOD_TITLES = {"fixmatch": "FixMatch", "fixmatch_daso": "FixMatch + DASO"}
CODES = ("official", "imbssl")
KINDS = ("linear", "semantic", "final")
WARMUP = 500  # DASO warm-up of the mini protocol (both codes)
COLLAPSE_WINDOWS = ((400, 500), (500, 600), (600, 700), (700, 800))
CHECKPOINT_STEPS = (200, 500, 1000, 1500, 2000)
MASK_SPANS = ((0, 500), (500, 1000), (1000, 1500), (1500, 2000))


# ----------------------------------------------------------------------------- reading
def _json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def identify(run_dir: Path) -> tuple[str, str, int] | None:
    """(code, method, seed) of a run folder: from the queue's name <code>-<method>-seed<N>,
    else from its config.yaml."""
    import yaml

    code, _, rest = run_dir.name.partition("-")
    method, _, seed = rest.partition("-seed")
    if code in CODES and method in METHODS and seed.isdigit():
        return code, method, int(seed)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    code = cfg.get("code", "imbssl")
    pseudo = (cfg.get("pseudo") or {}).get("name", "none")
    method = "fixmatch_daso" if pseudo == "daso" else "fixmatch"
    return code, method, int(cfg.get("seed", 0))


def last_values(per_class: list[dict], source: str, kind: str, metric: str) -> list[float]:
    """Per-class values of the last step that has them (class order), [] when none."""
    rows = [r for r in per_class if r["source"] == source and r["kind"] == kind
            and r["metric"] == metric and r.get("subset", "all") == "all"]
    if not rows:
        return []
    last = max(int(r["step"]) for r in rows)
    values = {int(r["class"]): float(r["value"]) for r in rows if int(r["step"]) == last}
    return [values.get(c, math.nan) for c in range(max(values) + 1)]


def window_mean(points: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    """Mean of the values logged at steps in (lo, hi] (each covers the interval before it)."""
    vals = [v for s, v in points if lo < s <= hi]
    return statistics.fmean(vals) if vals else None


def read_run(run_dir: Path) -> dict | None:
    summary = _json(run_dir / "summary.json")
    ident = identify(run_dir)
    if ident is None:
        return None
    code, method, seed = ident
    finished = bool(summary and summary.get("status") == "finished")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not finished and code == "official":  # converted at the end: convert what is logged
        rows = official_rows_so_far(run_dir)
    bal = [(r["step"], r["balanced_acc"]) for r in rows
           if r.get("split") == "test" and r.get("balanced_acc") is not None]
    mask = [(r["step"], r["mask/ratio"]) for r in rows
            if r.get("split") == "train" and r.get("mask/ratio") is not None]
    rec = {"run": run_dir.name, "code": code, "method": method, "seed": seed,
           "finished": finished, "last_step": max((r.get("step", 0) for r in rows), default=0),
           "bal_acc_curve": bal, "mask_curve": mask}
    if not finished:
        return rec
    try:
        with open(run_dir / "per_class.csv", newline="") as fh:
            per_class = list(csv.DictReader(fh))
    except OSError:
        per_class = []
    n = summary.get("summary_last", 5)
    rec.update({
        "iterations": summary.get("step"),
        "bal_acc_final": summary["final"].get("test/balanced_acc"),
        "bal_acc_median": summary.get(f"median_last{n}", {}).get("test/balanced_acc"),
        "mask_after_warmup": window_mean(mask, WARMUP, summary.get("step") or 0),
        "mask_last_500": window_mean(mask, (summary.get("step") or 0) - 500,
                                     summary.get("step") or 0),
        "mask_windows": [window_mean(mask, lo, hi) for lo, hi in COLLAPSE_WINDOWS],
        "test_recall": last_values(per_class, "test", "prediction", "recall"),
        "m_hat": last_values(per_class, "refiner", "daso", "m_hat"),
        **{f"pl_{k}_recall": last_values(per_class, "pseudo", k, "recall") for k in KINDS},
        "timing": timing(run_dir.parent / f"{run_dir.name}.timing.jsonl",
                         summary.get("step") or 0),
    })
    return rec


def official_rows_so_far(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of a running official run, converted in memory."""
    from official_daso import convert_rows, official_output

    try:
        out = official_output(run_dir)
    except FileNotFoundError:
        return []
    rows, _ = convert_rows(read_jsonl(out / "metrics.json"),
                           read_jsonl(run_dir / "instrument.jsonl"), 10)
    return rows


def timing(path: Path, iterations: int) -> dict | None:
    """Wall and CPU (user + system) seconds per iteration over every attempt of a run,
    start-up and evaluations included."""
    rows = read_jsonl(path)
    if not rows or not iterations:
        return None
    cpu = sum(r.get("user_s", 0) + r.get("sys_s", 0) for r in rows)
    wall = sum(r.get("wall_s", r.get("wall_s_since_watch", 0)) for r in rows)
    user = sum(r.get("user_s", 0) for r in rows)
    return {"cpu_s_per_it": cpu / iterations, "wall_s_per_it": wall / iterations,
            "user_s_per_it": user / iterations,
            "attempts": len(rows), "starts": [r.get("start") for r in rows],
            "spans": [span for r in rows if (span := _span(r)) is not None]}


def _span(row: dict) -> tuple[float, float] | None:
    """(start, end) of one attempt in seconds since the epoch (UTC start + wall)."""
    try:
        start = calendar.timegm(time.strptime(row["start"], "%Y-%m-%dT%H:%M:%S"))
        return float(start), float(start) + float(row["wall_s"])
    except (KeyError, TypeError, ValueError):
        return None


def shared_share(a: dict | None, b: dict | None) -> float | None:
    """The share of the two runs' training time (the shorter one's) during which both were
    training: 1 when the queue ran them side by side, 0 when one after the other."""
    if not a or not b or not a.get("spans") or not b.get("spans"):
        return None
    both = sum(max(0.0, min(e1, e2) - max(s1, s2))
               for s1, e1 in a["spans"] for s2, e2 in b["spans"])
    shorter = min(sum(e - s for s, e in x["spans"]) for x in (a, b))
    return both / shorter if shorter > 0 else None


def read_runs(runs: Path) -> list[dict]:
    out = []
    for d in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        rec = read_run(d)
        if rec is not None:
            out.append(rec)
    return out


# ----------------------------------------------------------------------------- statistics
def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def fmt(values: list, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std([v * scale if v is not None else None for v in values])
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def acceptance(official: list[dict], imbssl: list[dict], key: str, floor: float) -> str:
    """|mean official - mean imbssl| against max(floor, the larger seed std), in points."""
    a, sa = mean_std([r[key] * 100 for r in official if r.get(key) is not None])
    b, sb = mean_std([r[key] * 100 for r in imbssl if r.get(key) is not None])
    if a is None or b is None:
        return "–"
    stds = [s for s in (sa, sb) if s is not None]
    bound = max([floor] + stds)
    seeds = f"{len(official)} and {len(imbssl)} seeds"
    verdict = "within" if abs(a - b) <= bound else "OUTSIDE"
    note = "" if stds else " (no std: one seed per code)"
    return f"{a - b:+.2f} ({verdict} ±{bound:.2f}; {seeds}{note})"


def curve_stats(records: list[dict], key: str) -> tuple[list[int], list[float], list[float],
                                                          list[float]]:
    """Steps, mean, min and max over seeds of a curve (steps every seed has)."""
    by_step: dict[int, list[float]] = {}
    for r in records:
        for step, value in r[key]:
            by_step.setdefault(int(step), []).append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(records))
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


# ----------------------------------------------------------------------------- figure
def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colors = {"official": "tab:red", "imbssl": "tab:blue"}
    for col, method in enumerate(METHODS):
        for row, (key, title) in enumerate((("bal_acc_curve", "test balanced accuracy (%)"),
                                            ("mask_curve", "mask ratio (%)"))):
            ax = axes[row][col]
            for code in CODES:
                for r in records:  # runs still training: one dashed line each
                    if r["code"] == code and r["method"] == method and not r["finished"] \
                            and r[key]:
                        ax.plot([s for s, _ in r[key]], [v * 100 for _, v in r[key]],
                                color=colors[code], linestyle="--", linewidth=1,
                                label=f"{code} seed {r['seed']} (running, to {r['last_step']})")
                rs = [r for r in records if r["code"] == code and r["method"] == method
                      and r["finished"]]
                if not rs:
                    continue
                steps, mean, lo, hi = curve_stats(rs, key)
                label = f"{code} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
                ax.plot(steps, [v * 100 for v in mean], color=colors[code], label=label,
                        marker="o", markersize=2)
                if len(rs) > 1:
                    ax.fill_between(steps, [v * 100 for v in lo], [v * 100 for v in hi],
                                    color=colors[code], alpha=0.2, linewidth=0)
            if method.endswith("daso"):
                ax.axvline(WARMUP, color="gray", linestyle=":", linewidth=1)
            ax.set_title(f"{METHOD_TITLES[method]}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("iteration")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle("CIFAR-10-LT uniform (gamma_l 100, gamma_u 1), mini protocol: official DASO "
                 "code vs imbssl on the same images\n(finished runs: mean over seeds, band: "
                 "min-max over seeds; dashed: a run still training; dotted: end of DASO's "
                 "warm-up)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown
def per_class_lines(records: list[dict], key: str, title: str) -> list[str]:
    rows = []
    for method in METHODS:
        for code in CODES:
            rs = [r for r in records if r["code"] == code and r["method"] == method
                  and r.get(key)]
            if not rs:
                continue
            k = max(len(r[key]) for r in rs)
            cells = []
            for c in range(k):
                vals = [r[key][c] for r in rs if c < len(r[key]) and not math.isnan(r[key][c])]
                cells.append(f"{statistics.fmean(vals) * 100:.0f}" if vals else "–")
            rows.append(f"| {METHOD_TITLES[method]} | {code} | {len(rs)} | " + " | ".join(cells)
                        + " |")
    if not rows:
        return []
    k = max(len(r.get(key) or []) for r in records)
    return [f"### {title}", "",
            "| method | code | seeds | " + " | ".join(str(c) for c in range(k)) + " |",
            "|---|---|---|" + "---|" * k] + rows + [""]


def render(records: list[dict], figure: str) -> str:
    done = [r for r in records if r["finished"]]
    pending = [r for r in records if not r["finished"]]
    out = ["# The official DASO code beside imbssl at the mini protocol, on the same images",
           "",
           "Produced by `python analysis/official_daso.py` from the run folders in "
           "`analysis/results/official_side_by_side_runs/` (trained by "
           "`analysis/official_daso_queue.py`); do not edit by hand.", "",
           "Setting: CIFAR-10-LT uniform (gamma_l 100, gamma_u 1, N1 1500, M1 3000, 500 "
           "validation images per class), the CPU mini protocol (docs/mini_protocol.md): "
           "WRN-16-1, 2000 iterations, labeled batch 32, ratio 2, EMA decay 0.99, evaluation "
           "every 100 iterations on the 10,000 test images; DASO warm-up 500, m_hat period 50, "
           "T_dist 0.3. The official code is github.com/ytaek-oh/daso at commit 3541a6c "
           "(`analysis/official_daso_run.py`: the mini protocol through its own config keys, "
           "the shims listed in its docstring); imbssl runs `dataset.split_protocol="
           "official_daso`, so both codes train on the same labeled, unlabeled and validation "
           "images for a seed (checked image by image at each official run's start: "
           "`meta.json: same_images_as_imbssl`). Numbers in %, mean ± sample std over seeds.",
           "", f"**Runs finished: {len(done)} of 12** "
           f"({', '.join(sorted(r['run'] for r in done)) or 'none'}).", ""]
    if pending:
        out += ["Not finished (last logged step): " + ", ".join(
            f"{r['run']} ({r['last_step']})" for r in sorted(pending, key=lambda r: r['run']))
            + ".", ""]
    out += [f"![curves]({figure})", "", "## Final numbers", "",
            "| method | code | seeds | bal. acc. final | bal. acc. median of last 5 | "
            "mask ratio after warm-up (500-2000) | mask ratio 1500-2000 |",
            "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for code in CODES:
            rs = [r for r in done if r["code"] == code and r["method"] == method]
            if rs:
                out.append(f"| {METHOD_TITLES[method]} | {code} | "
                           f"{','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))}"
                           f" | {fmt([r['bal_acc_final'] for r in rs])} | "
                           f"{fmt([r['bal_acc_median'] for r in rs])} | "
                           f"{fmt([r['mask_after_warmup'] for r in rs])} | "
                           f"{fmt([r['mask_last_500'] for r in rs])} |")
    out += ["", "## Run by run, finished or not", "",
            "Test balanced accuracy (%) at some evaluations and mean mask ratio (%) over "
            "iterations, per run; a run still training shows what it has logged. Runs of one "
            "seed trained on the same images.", "",
            "| run | last step | " + " | ".join(f"bal. acc. {s}" for s in CHECKPOINT_STEPS)
            + " | " + " | ".join(f"mask {lo}-{hi}" for lo, hi in MASK_SPANS) + " |",
            "|---|---|" + "---|" * (len(CHECKPOINT_STEPS) + len(MASK_SPANS))]
    for r in sorted(records, key=lambda r: (r["seed"], METHODS.index(r["method"]), r["code"])):
        at = dict(r["bal_acc_curve"])
        cells = [f"{at[s] * 100:.1f}" if s in at else "–" for s in CHECKPOINT_STEPS]
        for lo, hi in MASK_SPANS:
            m = window_mean(r["mask_curve"], lo, hi) if r["last_step"] >= hi else None
            cells.append(f"{m * 100:.1f}" if m is not None else "–")
        out.append(f"| {r['run']} | {r['last_step']} | " + " | ".join(cells) + " |")
    out += ["", "## Acceptance (issue 31)", "",
            "Official minus imbssl, in points; bound: max(1.0, larger seed std) for the final "
            "balanced accuracy, max(2.0, larger seed std) for the mask ratio after the warm-up.",
            "", "| method | Δ bal. acc. final | Δ mask ratio after warm-up |", "|---|---|---|"]
    for method in METHODS:
        off = [r for r in done if r["code"] == "official" and r["method"] == method]
        imb = [r for r in done if r["code"] == "imbssl" and r["method"] == method]
        out.append(f"| {METHOD_TITLES[method]} | {acceptance(off, imb, 'bal_acc_final', 1.0)} | "
                   f"{acceptance(off, imb, 'mask_after_warmup', 2.0)} |")
    out += ["", "## DASO's mask ratio around the end of its warm-up", "",
            "Mean mask ratio (%) in 100-iteration windows: the last one of the warm-up and the "
            "first three after it (FixMatch beside it for reference).", "",
            "| method | code | seeds | " + " | ".join(f"{lo}-{hi}" for lo, hi in COLLAPSE_WINDOWS)
            + " |", "|---|---|---|" + "---|" * len(COLLAPSE_WINDOWS)]
    for method in METHODS:
        for code in CODES:
            rs = [r for r in done if r["code"] == code and r["method"] == method]
            if rs:
                cells = [fmt([r["mask_windows"][i] for r in rs])
                         for i in range(len(COLLAPSE_WINDOWS))]
                out.append(f"| {METHOD_TITLES[method]} | {code} | {len(rs)} | "
                           + " | ".join(cells) + " |")
    out += ["", "## Per class at the end", "",
            "Recall (%) of the pseudo-labels of the unlabeled images of the last evaluation "
            "window (iterations 1900-2000) against their true labels; FixMatch's linear and "
            "final labels are the same. Mean over seeds.", ""]
    for kind in KINDS:
        out += per_class_lines(done, f"pl_{kind}_recall", f"{kind} pseudo-labels, recall")
    out += per_class_lines(done, "test_recall", "test recall (EMA model, final evaluation)")
    out += per_class_lines([r for r in done if r["method"] == "fixmatch_daso"], "m_hat",
                           "DASO's m_hat at the end (share of final pseudo-labels per class, "
                           "%)")
    out += ["## Seconds per iteration (CPU time)", "",
            "Each run is one process with one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1))"
            " on the same 2-core machine, shared with other work: seed 0's runs one at a "
            "time, later seeds with the official and the imbssl run of a method side by side "
            "(the queue's --parallel 2; column 'together': the share of the shorter run's "
            "wall time during which both trained). Wall time depends on the load; CPU seconds (user + system, of the whole "
            "run: start-up, data loading and augmentation, training and 20 evaluations on the "
            "test and validation images, divided by 2000) are the measure that compares. The "
            "ratio is official / imbssl for the same method and seed; it is a CPU ratio, not a "
            "GPU one.", "",
            "| method | seed | official CPU s/it | imbssl CPU s/it | ratio | ratio of user time "
            "only | official wall s/it | imbssl wall s/it | together |",
            "|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for seed in sorted({r["seed"] for r in done}):
            pair = {r["code"]: r for r in done if r["method"] == method and r["seed"] == seed}
            t = {c: (pair.get(c) or {}).get("timing") for c in CODES}
            if not any(t.values()):
                continue

            def cell(code, key, t=t):
                return f"{t[code][key]:.3f}" if t.get(code) else "–"

            ratio = (f"{t['official']['cpu_s_per_it'] / t['imbssl']['cpu_s_per_it']:.2f}"
                     if t["official"] and t["imbssl"] else "–")
            user = (f"{t['official']['user_s_per_it'] / t['imbssl']['user_s_per_it']:.2f}"
                    if t["official"] and t["imbssl"] else "–")
            out.append(f"| {METHOD_TITLES[method]} | {seed} | {cell('official', 'cpu_s_per_it')}"
                       f" | {cell('imbssl', 'cpu_s_per_it')} | {ratio} | {user} | "
                       f"{cell('official', 'wall_s_per_it')} | {cell('imbssl', 'wall_s_per_it')} | "
                       f"{_share_cell(shared_share(t['official'], t['imbssl']))} |")
    out.append("")
    return "\n".join(out)


def _share_cell(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f} %"


def write_comparison(runs: Path, out: Path) -> Path:
    records = read_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "official_side_by_side.png"
    plot(records, figure)
    md = out / "official_side_by_side.md"
    md.write_text(render(records, figure.name))
    print(f"{sum(r['finished'] for r in records)} finished runs -> {md}")
    return md
