"""One-file HTML report (figures embedded) and its Markdown twin for one or several runs.

``build_report(run_dirs, out)`` writes ``out.html``, ``out.md`` and the figures (PNG + SVG)
in ``out_files/``; ``report_main`` is the ``imbssl report RUN [RUN ...] [--out PATH]`` CLI.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from imbssl.diagnostics.findings import balanced_test_set, findings
from imbssl.diagnostics.logfile import Run, finite, is_run_dir, read_run, short_value
from imbssl.diagnostics.plots import (
    FigureFile,
    class_order,
    make_figures,
    per_class_at,
    pseudo_kind,
    run_labels,
)
from imbssl.diagnostics.summary_stats import (
    FINAL,
    Choice,
    choose_stat,
    num_evaluations,
    parse_stat,
    run_history,
    run_statistic,
    run_window,
    run_window_key,
    stat_text,
    statistic,
)

DASH = "\u2013"
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1180px; margin: 24px auto; padding: 0 16px; line-height: 1.4; }
h1 { border-bottom: 2px solid #345; padding-bottom: 4px; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: 2px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #eef2f6; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 12px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 13px; color: #555; }
.note { color: #666; font-size: 13px; max-width: 640px; }
ul.findings li { margin-bottom: 6px; max-width: 760px; }
.figrow { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.figrow figure { flex: 1 1 45%; margin: 0 0 16px; }
.row { display: flex; flex-wrap: wrap; gap: 32px; align-items: flex-start; }
.status-finished { color: #1a7f37; } .status-running { color: #9a6700; }
.status-stopped, .status-incomplete { color: #cf222e; }
/* a wide table scrolls inside its own box; its first column stays in view */
.scroll { overflow-x: auto; max-width: 100%; -webkit-overflow-scrolling: touch; }
.scroll th:first-child, .scroll td:first-child { position: sticky; left: 0;
       background: #fff; z-index: 1; }
.scroll th:first-child { background: #eef2f6; }
.row > div { min-width: 0; max-width: 100%; }
th { white-space: nowrap; }
td { overflow-wrap: break-word; }
.scroll td:first-child { white-space: nowrap; }
@media (max-width: 700px) {
  body { margin: 8px auto; padding: 0 8px; }
  h1 { font-size: 1.3em; margin: 0.3em 0; }
  h2 { font-size: 1.15em; margin-top: 1.4em; }
  table { font-size: 12px; }
  th { white-space: normal; }
  th, td { padding: 2px 4px; }
  .row { display: block; }
  .figrow figure { flex-basis: 100%; }
  figure { margin: 8px 0 16px; }
  figure img { width: 100%; }
}
"""


@dataclass
class Table:
    """A table block: header cells and rows of text cells."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Block:
    """One element of the report: heading, paragraph, table or figure."""

    kind: str  # h1 | h2 | h3 | p | ul | table | row (tables side by side) | figure | figrow
    content: str | list[str] | Table | list[Table] | FigureFile | list[FigureFile]


def pct(value) -> str:
    """A fraction as a percentage with 2 decimals, or a dash."""
    return f"{100 * float(value):.2f}" if finite(value) else DASH


def num(value, digits: int = 3) -> str:
    """A number with ``digits`` decimals (integers without), or a dash."""
    if not finite(value):
        return DASH
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:.{digits}f}"


def settings(run: Run) -> dict[str, str]:
    """The run's settings as display strings."""
    keys = {"algorithm": "algorithm.name", "pseudo": "pseudo.name", "dataset": "dataset.name",
            "N1": "dataset.n1", "M1": "dataset.m1", "gamma_l": "dataset.gamma_l",
            "gamma_u": "dataset.gamma_u", "reversed unlabeled": "dataset.reverse_unlabeled",
            "seed": "seed", "iterations": "trainer.iterations"}
    out = {name: short_value(run.cfg(key, DASH)) for name, key in keys.items()}
    out["status"] = run.status
    out["last step"] = str(run.last_step)
    out["test evaluations"] = str(run.num_evals("test"))
    for key in ("git_commit", "device", "torch", "start_time"):
        if run.meta.get(key):
            out[key.replace("_", " ")] = str(run.meta[key])
    out["folder"] = str(run.path)
    return out


def _accuracy_columns(runs: Sequence[Run], stat: str) -> list[tuple[str, str, str]]:
    """(header, metric, stat) of the result table: top-1 and balanced accuracy (one column
    when the test set is balanced and they are equal), plain and post-hoc LA."""
    name = "final" if stat == FINAL else stat
    same = all(balanced_test_set(r) for r in runs)
    metrics = [("top-1 = bal. acc", "test/balanced_acc")] if same else [
        ("top-1", "test/top1"), ("bal. acc", "test/balanced_acc")]
    if any(run_history(r, "test/balanced_acc_posthoc_la") for r in runs):
        metrics.append(("post-hoc LA bal. acc", "test/balanced_acc_posthoc_la"))
    stats = [FINAL] if stat == FINAL else [FINAL, stat]
    return [(f"{'final' if st == FINAL else name} {head}", metric, st)
            for st in stats for head, metric in metrics]


def result_table(runs: Sequence[Run], labels: Sequence[str], choice: Choice) -> Table:
    """The result first (it must fit a phone's first screen): one row per run, its test
    accuracies (%) by the final evaluation and by the statistic the runs are compared by."""
    columns = _accuracy_columns(runs, choice.stat)
    rows = [[label, *(pct(run_statistic(run, metric, st)) for _, metric, st in columns)]
            for run, label in zip(runs, labels)]
    keys = sorted({run_window_key(r) for r in runs})
    text = (f"Test accuracies in %. final = the last evaluation; {keys[0]} = "
            f"the {stat_text(keys[0])} (trainer.summary_reduce, trainer.summary_last), "
            "shown only when every run has that many. "
            if len(keys) == 1 else "Test accuracies in %. final = the last evaluation. ")
    if any("posthoc_la" in metric for _, metric, _ in columns):
        text += ("Post-hoc LA: the classifier's logits minus log of the labeled class "
                 "frequencies (tau 1), from the same evaluation. ")
    return Table(["run", *(head for head, _, _ in columns)], rows,
                 text + " ".join(choice.notes))


def ranking_sentence(runs: Sequence[Run], labels: Sequence[str], choice: Choice) -> str:
    """Which run is best by the statistic every run has (the same one compare uses)."""
    values = [run_statistic(r, "test/balanced_acc", choice.stat) for r in runs]
    order = sorted((i for i in range(len(runs)) if finite(values[i])),
                   key=lambda i: -values[i])
    if not order:
        return "No test evaluation logged yet."
    ranked = ", ".join(f"{labels[i]} {pct(values[i])}" for i in order)
    if len(runs) == 1:
        return f"Test balanced accuracy, {stat_text(choice.stat)} ({choice.stat}): {ranked}."
    return (f"Ranked by test balanced accuracy, {stat_text(choice.stat)} "
            f"({choice.stat}): {ranked}.")


def runs_table(runs: Sequence[Run], labels: Sequence[str]) -> Table:
    """Settings, status, progress and evaluations: one row per setting, one column per run
    (narrow enough for a phone when a few runs are compared)."""
    keys = ["algorithm", "pseudo", "dataset", "N1", "M1", "gamma_l", "gamma_u", "seed",
            "iterations"]
    every = [settings(r) for r in runs]
    rows = [[key, *(s[key] for s in every)] for key in keys]
    rows += [["status", *(r.status for r in runs)],
             ["last step", *(str(r.last_step) for r in runs)],
             ["test evaluations", *(str(num_evaluations(r)) for r in runs)]]
    return Table(["setting", *labels], rows)


IGNORED_SETTINGS = ("run_dir", "resume", "overwrite", "experiment_name", "notes", "logger",
                    "trainer.progress", "trainer.report", "trainer.tensorboard")


def differing_settings(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Config keys whose values differ between runs (dotted key -> one value per run). A group
    chosen differently (e.g. pseudo=none vs pseudo=daso) is one entry, ``<group>.name``."""
    from imbssl.diagnostics.loggers import flatten

    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    groups = {k.rpartition(".")[0] for k in keys if k.endswith(".name")
              and len({short_value(f.get(k, DASH)) for f in flat}) > 1}
    out = {}
    for key in keys:
        if key.startswith(IGNORED_SETTINGS) or (key.rpartition(".")[0] in groups
                                                 and not key.endswith(".name")):
            continue
        values = [short_value(f.get(key, DASH)) for f in flat]
        if len(set(values)) > 1:
            out[key] = values
    return out


def settings_sentence(diff: dict[str, list[str]]) -> str:
    """ "The runs differ in 1 setting: pseudo.name (none vs daso)." """
    if not diff:
        return "The runs' configs are identical (apart from run folder and logging)."
    parts = [f"{k} ({' vs '.join(v)})" for k, v in diff.items()]
    noun = "setting" if len(diff) == 1 else "settings"
    return f"The runs differ in {len(diff)} {noun}: " + "; ".join(parts) + "."


DELTA_METRICS = (("test", "prediction", "recall", "test R"),
                 ("pseudo", "final", "recall", "pseudo R"),
                 ("pseudo", "final", "precision", "pseudo P"))


def delta_table(runs: Sequence[Run], labels: Sequence[str]) -> Table | None:
    """Per class, head to tail: test recall and final pseudo-label recall/precision of the
    first run and each other run's difference to it, in percentage points."""
    if len(runs) < 2:
        return None
    headers, columns = ["class", "labeled"], []
    for source, kind, metric, name in DELTA_METRICS:
        wides = [_wide(r, source, kind if source == "test" else pseudo_kind(r)) for r in runs]
        if all(w.empty for w in wides):
            continue
        headers.append(f"{name} {labels[0]}")
        columns.append((wides[0], None, metric))
        for label, wide in zip(labels[1:], wides[1:]):
            headers.append(f"\u0394 {name} {label}")
            columns.append((wide, wides[0], metric))
    if not columns:
        return None
    lab = runs[0].labeled_counts or []
    rows = [[runs[0].class_names[c], _at(lab, c)]
            + [_delta(w, base, c, m) for w, base, m in columns] for c in class_order(runs[0])]
    note = (f" {BASE_UNDEFINED} = the other run's value, not a difference: {labels[0]} never "
            "predicted the class, so its precision is undefined."
            if any(BASE_UNDEFINED in cell for row in rows for cell in row) else "")
    return Table(headers, rows, f"Classes head to tail. Values of {labels[0]} in %, \u0394 = "
                 "other run minus it, in percentage points; test recall at each run's last "
                 "evaluation, pseudo-labels (final, all) over the interval ending there." + note)


BASE_UNDEFINED = "\u2020"  # dagger: the value itself, the first run's being undefined


def _delta(wide: pd.DataFrame, base: pd.DataFrame | None, c: int, metric: str) -> str:
    """wide's value (base is None) or wide - base, in % / points; the value with a dagger
    when only the first run's is undefined; a dash when wide's is."""
    value = _value(wide, c, metric)
    if base is None:
        return pct(value)
    ref = _value(base, c, metric)
    if finite(value) and finite(ref):
        return f"{100 * (value - ref):+.2f}"
    return f"{pct(value)} {BASE_UNDEFINED}" if finite(value) else DASH


def _value(wide: pd.DataFrame, c: int, metric: str) -> float:
    """wide.loc[c, metric], NaN when missing or undefined (0 / 0)."""
    text = _get(wide, c, metric, lambda v: str(float(v)))
    return float(text) if text != DASH else float("nan")


def text_table(table: Table) -> str:
    """A fixed-width text rendering of a table (for the terminal)."""
    cells = [table.headers, *table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table.headers))]
    lines = ["  ".join(str(h).rjust(w) if i else str(h).ljust(w)
                       for i, (h, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def metrics_table(run: Run) -> Table:
    """Final (or last) value and the run's window statistic of each metric (%): the median
    (or mean, trainer.summary_reduce) of the last k evaluations, k = the run's
    trainer.summary_last, only where there are k values."""
    k, key = run_window(run), run_window_key(run)
    names = list(dict.fromkeys([*run.final_metrics(), "test/top1", "test/balanced_acc"]))
    rows = [[name, pct(run_statistic(run, name, FINAL)),
             _window_cell(run_history(run, name), key)] for name in names]
    for name in _pseudo_metric_names(run):
        series = run.split_series(_pseudo_split(run, name), name).tolist()
        rows.append([name, pct(series[-1]), _window_cell(series, key)])
    source = "metrics.jsonl" if len(run.metrics) else "summary.json"
    source += "" if run.summary else " (no summary.json yet)"
    what = stat_text(key).replace("evaluations", "values")
    return Table(["metric", "final / last", key], rows,
                 f"In %, from {source}; {key} = {what} (trainer.summary_reduce, "
                 f"trainer.summary_last), only where there are {k}; pseudo-label metrics "
                 "per logging interval.")


def _window_cell(values: Sequence[float], key: str) -> str:
    """The window statistic ``key`` of the values, or why there is none."""
    value = statistic(values, key)
    return pct(value) if finite(value) else f"{DASH} ({len(values)} < {parse_stat(key)})"


def _pseudo_split(run: Run, name: str) -> str:
    """The metrics.jsonl split a pseudo-label metric is logged under."""
    return "pseudo" if len(run.split_series("pseudo", name)) else "train"


def _pseudo_metric_names(run: Run) -> list[str]:
    """Logged pseudo-label accuracies (pseudo/<kind>/<subset>/acc or balanced_acc)."""
    cols = [c for c in run.metrics.columns if str(c).startswith("pseudo/")]
    return [c for c in cols if c.rsplit("/", 1)[-1] in ("acc", "balanced_acc")
            and len(run.split_series(_pseudo_split(run, c), c))]


def _wide(run: Run, source: str, kind: str | None, subset: str = "all") -> pd.DataFrame:
    """Per-class metrics at the last step, or an empty frame."""
    return per_class_at(run, source, kind, subset) if kind else pd.DataFrame()


def per_class_table(run: Run) -> Table | None:
    """Per class: labeled/unlabeled counts, test P/R/F1/support, pseudo-label P/R (%)."""
    test = _wide(run, "test", "prediction")
    kind = pseudo_kind(run)
    pseudo, conf = _wide(run, "pseudo", kind), _wide(run, "pseudo", kind, "confident")
    if test.empty and pseudo.empty:
        return None
    lab = run.labeled_counts or []
    ulb = run.meta.get("unlabeled_counts") or []
    rows = []
    for c in class_order(run):
        rows.append([run.class_names[c], _at(lab, c), _at(ulb, c),
                     *(_get(test, c, m, pct) for m in ("precision", "recall", "f1")),
                     _get(test, c, "support", num),
                     *(_get(pseudo, c, m, pct) for m in ("precision", "recall")),
                     *(_get(conf, c, m, pct) for m in ("precision", "recall")),
                     _get(conf, c, "support", num)])
    headers = ["class", "labeled", "unlabeled", "test P", "test R", "test F1", "test n",
               "pseudo P", "pseudo R", "conf. P", "conf. R", "conf. n"]
    caption = ("Classes head to tail (by labeled count). "
               f"Test: step {_step(run, 'test', 'prediction')}; "
               f"pseudo-labels ({kind or 'none logged'}): interval ending at step "
               f"{_step(run, 'pseudo', kind)}, all and confident (mask = 1). In %; "
               "\u2013 = undefined (class never predicted: P; no samples: R).")
    return Table(headers, rows, caption)


def _at(values: Sequence, i: int) -> str:
    """values[i] as text, or a dash."""
    return str(values[i]) if i < len(values) else DASH


UNDEFINED_IF_ZERO = {"precision": "predicted", "recall": "support"}


def _get(wide: pd.DataFrame, c: int, metric: str, fmt) -> str:
    """Formatted wide.loc[c, metric]; a dash when missing or undefined (0 / 0)."""
    if wide.empty or c not in wide.index or metric not in wide.columns:
        return DASH
    den = UNDEFINED_IF_ZERO.get(metric)
    if den in wide.columns and wide.loc[c, den] == 0:
        return DASH
    return fmt(wide.loc[c, metric])


def _step(run: Run, source: str, kind: str | None) -> str:
    """Last step of the per-class rows of source/kind."""
    df = run.per_class
    steps = df.loc[(df["source"] == source) & (df["kind"] == kind), "step"]
    return str(int(steps.max())) if len(steps) else DASH


def build_blocks(runs: Sequence[Run], labels: Sequence[str],
                 figures: Sequence[FigureFile]) -> list[Block]:
    """The report's content, independent of the output format."""
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    choice = choose_stat(runs, labels=labels)
    blocks = [Block("h1", "imbssl diagnostics report"),
              Block("p", f"{len(runs)} run(s); generated {when}."),
              Block("h2", "Result"), Block("p", ranking_sentence(runs, labels, choice)),
              Block("table", result_table(runs, labels, choice))]
    blocks += [Block("p", f"Note: {w}.") for w in choice.warnings
               if not w.startswith("runs compared by")]
    notes = findings(runs, labels)
    if notes:
        blocks += [Block("h2", "What to notice"), Block("ul", notes)]
    blocks += [Block("h2", "Runs"), Block("table", runs_table(runs, labels))]
    if len(runs) > 1:
        diff = differing_settings(runs)
        blocks.append(Block("p", settings_sentence(diff)))
        if diff:
            blocks.append(Block("table", Table(["setting", *labels],
                                               [[k, *v] for k, v in diff.items()])))
        delta = delta_table(runs, labels)
        if delta is not None:
            blocks += [Block("h2", "Per-class differences"), Block("table", delta)]
    shared = [f for f in figures if f.run is None]
    blocks += [Block("figure", f) for f in shared]
    for i, (run, label) in enumerate(zip(runs, labels)):
        rows = [[k, v] for k, v in settings(run).items()]
        blocks += [Block("h2", f"Run: {label}"),
                   Block("row", [Table(["setting", "value"], rows), metrics_table(run)])]
        table = per_class_table(run)
        blocks.append(Block("table", table) if table else Block("p", "No per-class rows yet."))
        own = [f for f in figures if f.run == i]
        blocks += [Block("figure", f) for f in own]  # full width: heatmaps are wide
    return blocks


def _is_number(text: str) -> bool:
    """True for cells that should be right-aligned."""
    try:
        return math.isfinite(float(text.split(" / ")[0]))
    except ValueError:
        return text == DASH


def _html_table(table: Table) -> str:
    """A <table> with escaped cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in table.rows)
    caption = f'<p class="note">{html.escape(table.caption)}</p>' if table.caption else ""
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f"</table></div>{caption}")


def _html_cell(text: str) -> str:
    """A <td>, right-aligned for numbers, coloured for statuses."""
    cls = ' class="num"' if _is_number(text) else ""
    if text in ("finished", "running", "stopped", "incomplete"):
        cls = f' class="status-{text}"'
    return f"<td{cls}>{html.escape(text)}</td>"


def _html_figure(fig: FigureFile, base: Path | None = None) -> str:
    """A <figure> with the PNG embedded as base64; with ``base`` (the page's folder) the
    image links to its PNG file, which a phone opens full size."""
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    title = html.escape(fig.title)
    img = f'<img alt="{title}" src="data:image/png;base64,{data}">'
    if base is not None:
        href = html.escape(Path(os.path.relpath(fig.png, base)).as_posix())
        img = f'<a href="{href}">{img}</a>'
    return f"<figure>{img}<figcaption>{title}</figcaption></figure>"


def render_html(blocks: Sequence[Block], base: Path | None = None) -> str:
    """A self-contained HTML page (inline CSS, embedded images, no external resources);
    figures link to their PNG files relative to ``base``."""
    parts = []
    for b in blocks:
        if b.kind == "table":
            parts.append(_html_table(b.content))
        elif b.kind == "row":
            cells = "".join(f"<div>{_html_table(t)}</div>" for t in b.content)
            parts.append(f'<div class="row">{cells}</div>')
        elif b.kind == "figure":
            parts.append(_html_figure(b.content, base))
        elif b.kind == "figrow":
            parts.append('<div class="figrow">'
                         + "".join(_html_figure(f, base) for f in b.content) + "</div>")
        elif b.kind == "ul":
            items = "".join(f"<li>{html.escape(item)}</li>" for item in b.content)
            parts.append(f'<ul class="findings">{items}</ul>')
        else:
            parts.append(f"<{b.kind}>{html.escape(b.content)}</{b.kind}>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<title>imbssl report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _md_escape(text: str) -> str:
    """Escape pipes in a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    """A GitHub Markdown table with an optional italic caption."""
    lines = ["| " + " | ".join(map(_md_escape, table.headers)) + " |",
             "|" + "|".join(" --- " for _ in table.headers) + "|"]
    lines += ["| " + " | ".join(map(_md_escape, row)) + " |" for row in table.rows]
    return "\n".join(lines) + (f"\n\n*{table.caption}*" if table.caption else "")


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown with figures as PNG links relative to ``base`` (the .md's folder)."""
    parts = []
    for b in blocks:
        if b.kind == "table":
            parts.append(_md_table(b.content))
        elif b.kind == "row":
            parts += [_md_table(t) for t in b.content]
        elif b.kind in ("figure", "figrow"):
            figs = b.content if b.kind == "figrow" else [b.content]
            parts += [f"![{f.title}]({Path(os.path.relpath(f.png, base)).as_posix()})"
                      for f in figs]
        elif b.kind == "p":
            parts.append(b.content)
        elif b.kind == "ul":
            parts.append("\n".join(f"- {item}" for item in b.content))
        else:
            parts.append("#" * int(b.kind[1]) + " " + b.content)
    return "\n\n".join(parts) + "\n"


def _strip_suffix(path: Path) -> Path:
    """``report.html`` / ``report.md`` -> ``report``."""
    return path.with_suffix("") if path.suffix.lower() in (".html", ".htm", ".md") else path


def build_report(run_dirs: Sequence[str | os.PathLike],
                 out_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out_path``.html (self-contained), ``out_path``.md and ``out_path``_files/
    (the figures, PNG + SVG); returns the two pages."""
    bad = [str(d) for d in run_dirs if not is_run_dir(d)]
    if not run_dirs or bad:
        raise ValueError(f"not a run folder: {bad[0] if bad else '(none given)'}")
    runs = [read_run(d) for d in run_dirs]
    labels = run_labels(runs)
    out = _strip_suffix(Path(out_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = make_figures(runs, out.parent / f"{out.name}_files", labels)
    blocks = build_blocks(runs, labels, figures)
    html_path, md_path = out.with_name(out.name + ".html"), out.with_name(out.name + ".md")
    html_path.write_text(render_html(blocks, out.parent), encoding="utf-8")
    md_path.write_text(render_markdown(blocks, out.parent), encoding="utf-8")
    return html_path, md_path


def report_main(argv: Sequence[str] | None = None) -> int:
    """CLI: imbssl report RUN [RUN ...] [--out PATH]; prints the paths written (HTML page,
    Markdown page, figures folder), one per line."""
    parser = argparse.ArgumentParser(
        prog="imbssl report",
        description="Build an HTML + Markdown diagnostics report of one or several runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folder(s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path without suffix (default: RUN/report for one run, "
                             "./report for several)")
    args = parser.parse_args(argv)
    bad = [r for r in args.runs if not is_run_dir(r)]
    if bad:
        print(f"imbssl report: not a run folder (no config.yaml, metrics.jsonl or meta.json): "
              f"{bad[0]}", file=sys.stderr)
        return 2
    out = args.out or (args.runs[0] / "report" if len(args.runs) == 1 else Path("report"))
    if len(args.runs) > 1:
        runs = [read_run(r) for r in args.runs]
        labels = run_labels(runs)
        print(settings_sentence(differing_settings(runs)))
        delta = delta_table(runs, labels)
        if delta is not None:
            print(text_table(delta) + "\n")
    html_path, md_path = build_report(args.runs, out)
    for path in (html_path, md_path, files_folder(html_path)):
        print(path)
    return 0


def files_folder(page: Path) -> Path:
    """The figures folder beside a report page: ``cmp.html`` -> ``cmp_files``."""
    return page.with_name(_strip_suffix(page).name + "_files")


if __name__ == "__main__":
    sys.exit(report_main())
