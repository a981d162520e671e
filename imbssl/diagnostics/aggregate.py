"""Paper-style tables over many runs (a Hydra multirun folder): method x imbalance setting.

Each cell is the mean and sample standard deviation (ddof=1; 0 for a single run) over seeds
of one summary statistic of a metric, in % (``summary_stats``): by default the runs' window
statistic, the median (DASO protocol) or mean (``trainer.summary_reduce``) of the last k
evaluations (k = the runs' ``trainer.summary_last``) when every run has k evaluations, else
the final evaluation; the caption says which, and ``imbssl compare``
warns when the runs were evaluated differently. The same is done for the tail recall (mean
test recall of the 30% least-labeled classes), and both are plotted against gamma with
mean ± std bands.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from imbssl.diagnostics.logfile import CONFIG_FILE, METRICS_FILE, Run, read_run, short_value
from imbssl.diagnostics.summary_stats import (
    Choice,
    choose_stat,
    parse_stat,
    run_statistic,
    stat_text,
    statistic,
)

SETTING_KEYS = ("dataset", "n1", "m1", "gamma_l", "gamma_u", "reverse_unlabeled")
SETTING_TEXT = {"gamma": "gamma={}", "dataset": "{}", "n1": "N1={}", "m1": "M1={}",
                "gamma_l": "gamma_l={}", "gamma_u": "gamma_u={}",
                "reverse_unlabeled": "reversed={}"}
SETTING_TEX = {"gamma": r"$\gamma{{=}}{}$", "dataset": r"{}", "n1": r"$N_1{{=}}{}$",
               "m1": r"$M_1{{=}}{}$", "gamma_l": r"$\gamma_l{{=}}{}$",
               "gamma_u": r"$\gamma_u{{=}}{}$", "reverse_unlabeled": r"reversed{{=}}{}"}
TAIL_FRACTION = 0.3  # tail = the 30% of classes with the fewest labeled images (3 of 10)
CAPTION = ("{metric} ({stat}) in %: mean \u00b1 sample standard deviation (ddof=1) over "
           "{seeds}; std is 0 where a cell has a single run.")


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders (holding config.yaml and metrics.jsonl) at or below ``paths``, sorted."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if CONFIG_FILE in filenames and METRICS_FILE in filenames:
                found.add(Path(dirpath))
    return sorted(found, key=lambda p: (str(p.parent), _natural(p.name)))


def _natural(name: str) -> tuple:
    """Sort key putting Hydra's job folders 0, 1, ..., 10 in numeric order."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def method_label(run: Run) -> str:
    """Algorithm name, plus "+DASO" when ``pseudo.name`` is daso."""
    algo = str(run.cfg("algorithm.name", "?"))
    return f"{algo}+DASO" if str(run.cfg("pseudo.name", "none")).lower() == "daso" else algo


def run_value(run: Run, metric: str = "test/top1", stat: str = "final") -> float:
    """The run's ``stat`` of ``metric`` in % (NaN when the run does not have it)."""
    return 100.0 * run_statistic(run, metric, stat)


def tail_classes(run: Run, fraction: float = TAIL_FRACTION) -> list[int]:
    """The ceil(fraction * K) classes with the fewest labeled images (ties: higher index)."""
    from imbssl.diagnostics.plots import class_order

    order = class_order(run)
    return order[len(order) - math.ceil(fraction * len(order)):] if order else []


def tail_recall_series(run: Run, fraction: float = TAIL_FRACTION) -> pd.Series:
    """Mean test recall over the tail classes at each evaluation (index: step)."""
    df = run.per_class
    df = df[(df["source"] == "test") & (df["kind"] == "prediction") & (df["subset"] == "all")
            & (df["metric"] == "recall") & df["class"].isin(tail_classes(run, fraction))]
    return df.groupby("step")["value"].mean().astype(float)


def tail_recall(run: Run, stat: str = "final") -> float:
    """Tail recall in %, summarised by ``stat`` over its evaluations."""
    return 100.0 * statistic(tail_recall_series(run).tolist(), stat)


def run_record(run: Run, metric: str = "test/top1", stat: str = "final") -> dict:
    """One row of the per-run table: method, setting, seed, value and tail recall (%),
    status, path."""
    record = {"method": method_label(run), "algorithm": run.cfg("algorithm.name"),
              "pseudo": run.cfg("pseudo.name")}
    record.update({k: run.cfg(f"dataset.{'name' if k == 'dataset' else k}")
                   for k in SETTING_KEYS})
    record.update({"seed": run.cfg("seed"), "stat": stat,
                   "value": run_value(run, metric, stat),
                   "tail_recall": tail_recall(run, stat),
                   "evals": run.num_evals(metric.partition("/")[0]), "status": run.status,
                   "path": str(run.path)})
    return record


def collect_runs(paths: Iterable[str | os.PathLike], metric: str = "test/top1",
                 stat: str | None = None) -> pd.DataFrame:
    """Per-run records of every run folder found under ``paths``, all summarised by the one
    statistic every run has (``choose_stat``: ``stat``, or the runs' window statistic, falling back
    to the final evaluation); the choice is in ``records.attrs["choice"]``."""
    if stat is not None:
        parse_stat(stat)  # a clear error for an unknown name
    runs = [read_run(d) for d in find_run_dirs(paths)]
    choice = (choose_stat(runs, stat, [str(r.path) for r in runs]) if runs
              else Choice(stat or "final", [], []))
    records = [run_record(run, metric, choice.stat) for run in runs]
    columns = ["method", "algorithm", "pseudo", *SETTING_KEYS, "seed", "stat", "value",
               "tail_recall", "evals", "status", "path"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame.attrs["choice"] = choice
    return frame


def gammas_tied(records: pd.DataFrame) -> bool:
    """True when every run has gamma_u == gamma_l (or no gamma_u)."""
    gu = records["gamma_u"]
    return bool((gu.isna() | (gu.map(short_value) == records["gamma_l"].map(short_value))).all())


def varying_keys(records: pd.DataFrame) -> list[str]:
    """Setting keys that differ between runs; "gamma" stands for gamma_l = gamma_u when tied."""
    keys = [k for k in SETTING_KEYS if records[k].astype(str).nunique() > 1]
    keys = keys if "gamma_l" in keys else ["gamma_l", *keys]
    if gammas_tied(records):
        keys = ["gamma" if k == "gamma_l" else k for k in keys if k != "gamma_u"]
    return keys


def fixed_keys(records: pd.DataFrame) -> list[str]:
    """Setting keys with one value in all runs (not covered by the column labels)."""
    shown = set(varying_keys(records))
    shown |= {"gamma_l", "gamma_u"} if "gamma" in shown else set()
    return [k for k in SETTING_KEYS if k not in shown]


def setting_label(values: dict, keys: Sequence[str], tex: bool = False) -> str:
    """Compact column label such as "gamma_l=100, N1=1500" for the given keys."""
    fmt = SETTING_TEX if tex else SETTING_TEXT
    return ", ".join(fmt[k].format(short_value(values["gamma_l" if k == "gamma" else k]))
                     for k in keys)


def _std(values: pd.Series) -> float:
    """Sample std (ddof=1) for n > 1, 0 for n == 1, NaN for n == 0."""
    n = values.count()
    return float(values.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan"))


def _sort_key(value) -> tuple:
    """Numbers before strings, numbers numerically, None last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, int | float | np.number) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def aggregate(records: pd.DataFrame, column: str = "value") -> pd.DataFrame:
    """Tidy stats: one row per (method, setting) with mean, std (ddof=1) and n over seeds
    of ``column`` (the metric's value, or tail_recall)."""
    if records.empty:
        return pd.DataFrame(columns=["method", *SETTING_KEYS, "setting", "mean", "std", "n"])
    keys = varying_keys(records)
    rows = []
    for (method, *setting), group in records.groupby(
            ["method", *SETTING_KEYS], dropna=False, sort=False):
        values = dict(zip(SETTING_KEYS, setting))
        rows.append({"method": method, **values, "setting": setting_label(values, keys),
                     "mean": float(group[column].mean()), "std": _std(group[column]),
                     "n": int(group[column].count())})
    stats = pd.DataFrame(rows)
    order = sorted(range(len(stats)), key=lambda i: _row_sort(stats.iloc[i]))
    return stats.iloc[order].reset_index(drop=True)


def _row_sort(row: pd.Series) -> tuple:
    """Order rows by method (plain algorithm before its +DASO twin), then setting."""
    base, _, extra = str(row["method"]).partition("+")
    return (base, extra, *(_sort_key(row[k]) for k in SETTING_KEYS))


def _columns(stats: pd.DataFrame) -> list[str]:
    """Setting labels in sorted setting order."""
    firsts = stats.drop_duplicates("setting")
    order = sorted(range(len(firsts)),
                   key=lambda i: tuple(_sort_key(firsts.iloc[i][k]) for k in SETTING_KEYS))
    return [firsts.iloc[i]["setting"] for i in order]


def _cell(mean: float, std: float, n: int, show_n: bool, pm: str = " \u00b1 ") -> str:
    """ "mean ± std" (2 decimals), with "(n=..)" when seed counts differ between cells."""
    if not math.isfinite(mean):
        return "\u2013"
    return f"{mean:.2f}{pm}{std:.2f}" + (f" (n={n})" if show_n else "")


def paper_table(stats: pd.DataFrame, pm: str = " \u00b1 ", bold: str = "") -> pd.DataFrame:
    """Wide table of formatted cells: rows = method, columns = setting; best in ``bold``."""
    methods = list(dict.fromkeys(stats["method"]))
    columns = _columns(stats) if len(stats) else []
    show_n = stats["n"].nunique() > 1
    best = stats.groupby("setting")["mean"].max()
    table = pd.DataFrame("\u2013", index=methods, columns=columns, dtype=object)
    for _, row in stats.iterrows():
        text = _cell(row["mean"], row["std"], row["n"], show_n, pm)
        if bold and np.isclose(row["mean"], best[row["setting"]]):
            text = f"{bold}{text}{bold}"
        table.loc[row["method"], row["setting"]] = text
    table.index.name = "method"
    return table


def caption(stats: pd.DataFrame, records: pd.DataFrame, metric: str, stat: str,
            notes: Sequence[str] = ()) -> str:
    """Table caption: what a cell is (the statistic, and why that one), how many seeds, and
    the settings shared by all runs."""
    ns = sorted({int(n) for n in stats["n"]}) if len(stats) else [0]
    seeds = f"{ns[0]} seed(s)" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds (n per cell)"
    text = CAPTION.format(metric=metric, stat=stat_text(stat), seeds=seeds)
    if notes:
        text += " " + " ".join(notes)
    fixed = fixed_keys(records) if len(records) else []
    if len(records) and "gamma" in varying_keys(records):
        text += " gamma = gamma_l = gamma_u (labeled and unlabeled imbalance ratio)."
    if fixed:
        text += " Fixed: " + setting_label(records.iloc[0].to_dict(), fixed) + "."
    return text


def to_markdown(table: pd.DataFrame, caption_text: str = "") -> str:
    """A GitHub Markdown table (first column = index), caption above."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = [f"{caption_text}\n" if caption_text else "",
             "| " + " | ".join(header) + " |",
             "| " + " | ".join([":---"] + ["---:"] * len(table.columns)) + " |"]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name), *map(str, row.tolist())]) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text."""
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
            "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
            "^": r"\textasciicircum{}", "\u00b1": r"$\pm$"}
    return "".join(repl.get(ch, ch) for ch in str(text))


def to_latex(stats: pd.DataFrame, caption_text: str = "", label: str = "tab:results") -> str:
    """A booktabs LaTeX table; the best mean of each column is bold."""
    methods = list(dict.fromkeys(stats["method"]))
    columns = _columns(stats) if len(stats) else []
    keys = varying_keys(stats) if len(stats) else []
    heads = {r["setting"]: setting_label(r.to_dict(), keys, tex=True)
             for _, r in stats.iterrows()}
    show_n = stats["n"].nunique() > 1
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{latex_escape(caption_text)}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule",
             " & ".join(["Method", *(heads[c] for c in columns)]) + r" \\", r"\midrule"]
    for method in methods:
        cells = [latex_escape(method)]
        for col in columns:
            cells.append(_tex_cell(stats, method, col, show_n))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _tex_cell(stats: pd.DataFrame, method: str, column: str, show_n: bool) -> str:
    """One LaTeX cell, bold when its mean is the column's best."""
    hit = stats[(stats["method"] == method) & (stats["setting"] == column)]
    if hit.empty or not math.isfinite(hit["mean"].iloc[0]):
        return "--"
    row = hit.iloc[0]
    text = _cell(row["mean"], row["std"], row["n"], show_n, pm=r"$\pm$")
    best = stats.loc[stats["setting"] == column, "mean"].max()
    return rf"\textbf{{{text}}}" if np.isclose(row["mean"], best) else text


def plot_vs_gamma(stats: pd.DataFrame, out_dir: str | os.PathLike, ylabel: str,
                  stem: str = "accuracy_vs_gamma") -> list[Path]:
    """Mean ± std against gamma_l, one line per method, one panel per other setting."""
    from imbssl.diagnostics.plots import _figure, save_figure

    data = _panel_frame(stats[np.isfinite(stats["mean"].astype(float))])
    if data.empty:
        return []
    others = _panel_keys(data)
    panels = list(data.groupby(others, dropna=False, sort=False)) if others else [((), data)]
    panels.sort(key=lambda kv: tuple(map(_sort_key, _as_tuple(kv[0]))))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(4.6 * ncols + 1.6, 3.6 * nrows, nrows, ncols, sharey=True)
    legend = {}
    colours = dict(zip(dict.fromkeys(data["method"]), _palette(data["method"].nunique())))
    for ax, (key, part) in zip(axes.flat, panels):
        gammas = sorted(set(part["gamma_l"]), key=_sort_key)
        for method, rows in part.groupby("method", sort=False):
            rows = rows.sort_values("gamma_l", key=lambda s: s.map(_sort_key))
            x = ([gammas.index(g) for g in rows["gamma_l"]] if _categorical(part)
                 else rows["gamma_l"].astype(float))
            mean, std = rows["mean"].to_numpy(float), rows["std"].fillna(0).to_numpy(float)
            (legend[method],) = ax.plot(x, mean, marker="o", color=colours[method],
                                        label=method)
            ax.fill_between(x, mean - std, mean + std, color=colours[method], alpha=0.2,
                            linewidth=0)
        if _categorical(part):
            ax.set_xticks(range(len(gammas)), [short_value(g) for g in gammas])
        ax.set_title(setting_label(dict(zip(others, _as_tuple(key))), others) if others else "")
        ax.set_xlabel(_gamma_axis(data))
        ax.set_ylabel(ylabel, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=9,
               frameon=False, title="mean \u00b1 std\nover seeds", title_fontsize=8)
    return list(save_figure(fig, Path(out_dir), stem))


def _palette(n: int) -> list:
    """n distinguishable colours."""
    import seaborn as sns

    return sns.color_palette("colorblind", max(n, 1))


def _as_tuple(key) -> tuple:
    """A groupby key as a tuple."""
    return key if isinstance(key, tuple) else (key,)


def _panel_frame(stats: pd.DataFrame) -> pd.DataFrame:
    """Stats with gamma_u shown as "gamma_l" where it equals gamma_l (for panel titles)."""
    tied = stats["gamma_u"].isna() | (stats["gamma_u"].map(short_value)
                                      == stats["gamma_l"].map(short_value))
    return stats.assign(gamma_u=stats["gamma_u"].astype(object).where(~tied, "gamma_l"))


def _panel_keys(data: pd.DataFrame) -> list[str]:
    """Varying settings that are not determined by gamma_l (one panel per value)."""
    keys = [k for k in varying_keys(data) if k not in ("gamma_l", "gamma")]
    groups = data.astype({k: str for k in keys}).groupby("gamma_l", dropna=False)
    return [k for k in keys if groups[k].nunique(dropna=False).max() > 1]


def _gamma_axis(data: pd.DataFrame) -> str:
    """x-axis label; says so when gamma_u always equals gamma_l."""
    same = (data["gamma_u"].astype(str) == "gamma_l").all()  # see _panel_frame
    return "gamma_l = gamma_u (imbalance ratio)" if same else "gamma_l (labeled imbalance ratio)"


def _categorical(rows: pd.DataFrame) -> bool:
    """True when gamma_l values are not all numbers."""
    return not all(_sort_key(v)[0] == 0 for v in rows["gamma_l"])


def write_results(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  metric: str = "test/top1", stat: str | None = None,
                  records: pd.DataFrame | None = None) -> list[Path]:
    """Collect runs under ``paths`` (or take ``collect_runs``' ``records``) and write
    runs.csv, table.csv/.md/.tex and the plots, all with the statistic ``collect_runs``
    chose (``stat`` or its fallback)."""
    records = collect_runs(paths, metric, stat) if records is None else records
    if records.empty:
        raise FileNotFoundError("no run folders (config.yaml + metrics.jsonl) found")
    choice = records.attrs["choice"]
    stat = choice.stat
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = aggregate(records)
    text = caption(stats, records, metric, stat, choice.notes)
    tail = aggregate(records, "tail_recall")
    tail_text = caption(tail, records, f"Test tail recall = mean recall of the "
                        f"{TAIL_FRACTION:.0%} least-labeled classes;", stat, choice.notes)
    files = [out / "runs.csv", out / "table.csv", out / "table.md", out / "table.tex",
             out / "tail_recall.csv", out / "tail_recall.md"]
    records.to_csv(files[0], index=False)
    stats.to_csv(files[1], index=False)
    files[2].write_text(to_markdown(paper_table(stats, bold="**"), text), encoding="utf-8")
    files[3].write_text(to_latex(stats, text), encoding="utf-8")
    tail.to_csv(files[4], index=False)
    files[5].write_text(to_markdown(paper_table(tail, bold="**"), tail_text), encoding="utf-8")
    return (files + plot_vs_gamma(stats, out, f"{metric} ({stat_text(stat)}), %")
            + plot_vs_gamma(tail, out, f"tail recall ({stat_text(stat)}), %",
                            "tail_recall_vs_gamma"))


def collect_main(argv: Sequence[str] | None = None, prog: str = "collect_results.py") -> int:
    """CLI: collect_results.py MULTIRUN_DIR [RUN ...] [--metric test/top1] [--out DIR]."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Paper-style tables (method x imbalance setting, mean ± std over seeds) "
                    "of accuracy and tail recall, and both against gamma with mean ± std "
                    "bands, from a Hydra multirun folder or a list of run folders.")
    parser.add_argument("paths", nargs="+", help="multirun folder(s) or run folder(s)")
    parser.add_argument("--metric", default="test/top1", help="split/metric, e.g. test/top1")
    parser.add_argument("--stat", default=None,
                        help="final, median_last<k> or mean_last<k> (e.g. median_last20). "
                             "Default: the runs' own <trainer.summary_reduce>_last<k> (the "
                             "DASO-protocol median unless a recipe says mean), k = the runs' "
                             "trainer.summary_last, when every run has k evaluations, else "
                             "final. A window statistic some run lacks falls back to final, "
                             "with a warning")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <MULTIRUN_DIR>/results, or ./results)")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.paths[0]) / "results" if len(args.paths) == 1 else "results")
    try:
        if args.stat is not None:
            parse_stat(args.stat)
        records = collect_runs(args.paths, args.metric, args.stat)
        files = write_results(args.paths, out, args.metric, args.stat, records)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    for warning in records.attrs["choice"].warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    print((Path(out) / "table.md").read_text(encoding="utf-8"))
    print((Path(out) / "tail_recall.md").read_text(encoding="utf-8"))
    for path in files:
        print(f"wrote {path}")
    return 0
