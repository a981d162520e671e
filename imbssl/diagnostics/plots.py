"""Figures of a run's diagnostics (DASO paper Figure 1 style), from whatever is logged so far.

Figures are built with matplotlib's object API (no pyplot, so no global backend or state is
touched; rendering uses Agg) and each is saved as PNG and SVG.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from imbssl.diagnostics.logfile import Run, read_run, short_value
from imbssl.diagnostics.tracker import PSEUDO_KINDS, REFINER_STATE

logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no INFO chatter under Hydra

PNG_DPI = 110
MAX_TICKS = 30
HEATMAP_TICKS = 8  # iteration labels per heatmap panel (the same spacing in every panel)
LABEL_KEYS = (("algorithm.name", ""), ("pseudo.name", ""), ("dataset.name", ""),
              ("dataset.n1", "N1="), ("dataset.m1", "M1="), ("dataset.gamma_l", "γl="),
              ("dataset.gamma_u", "γu="), ("dataset.reverse_unlabeled", "rev="),
              ("seed", "seed "))


@dataclass
class FigureFile:
    """One saved figure: its title, the run it belongs to (None: all runs) and its files."""

    title: str
    png: Path
    svg: Path
    run: int | None = None


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    """A constrained-layout figure with whitegrid-styled axes (a 2-d array)."""
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save_figure(fig: Figure, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Save ``fig`` as ``stem``.png and ``stem``.svg in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
    fig.savefig(png, dpi=PNG_DPI)
    fig.savefig(svg)
    return png, svg


def _algo_label(run: Run) -> str:
    """Algorithm name, with "+DASO" when DASO refines its pseudo-labels."""
    algo = str(run.cfg("algorithm.name", "?"))
    pseudo = str(run.cfg("pseudo.name", "none"))
    return algo if pseudo in ("none", "None") else f"{algo}+{pseudo.upper()}"


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Short unique labels: the algorithm plus whichever settings differ between runs."""
    labels = [_algo_label(r) for r in runs]
    for key, prefix in LABEL_KEYS[2:]:
        values = [r.cfg(key) for r in runs]
        if len({str(v) for v in values}) > 1:
            labels = [f"{lab} {prefix}{short_value(v)}" for lab, v in zip(labels, values)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{r.path.name}]" for lab, r in zip(labels, runs)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i}" for i, lab in enumerate(labels)]
    return labels


def class_order(run: Run) -> list[int]:
    """Class indices from head to tail (most labeled images first; index order on ties)."""
    counts = run.labeled_counts
    if not counts or len(counts) != run.num_classes:
        return list(range(run.num_classes))
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def class_tick_labels(run: Run, order: Sequence[int]) -> list[str]:
    """Tick labels "name\\n(labeled count)" in ``order``."""
    names, counts = run.class_names, run.labeled_counts
    if not counts or len(counts) != len(names):
        return [names[c] for c in order]
    return [f"{names[c]}\n({counts[c]})" for c in order]


def pseudo_kind(run: Run) -> str | None:
    """The pseudo-label kind to show: "final" if logged, else "linear", else None."""
    kinds = set(run.per_class.loc[run.per_class["source"] == "pseudo", "kind"])
    return next((k for k in ("final", "linear") if k in kinds), None)


def per_class_at(run: Run, source: str, kind: str, subset: str = "all",
                 step: int | None = None) -> pd.DataFrame:
    """Wide per-class metrics (index class) at ``step`` (default: the last one logged)."""
    df = run.per_class
    df = df[(df["source"] == source) & (df["kind"] == kind) & (df["subset"] == subset)]
    if df.empty:
        return pd.DataFrame()
    df = df[df["step"] == (df["step"].max() if step is None else step)]
    return df.pivot_table(index="class", columns="metric", values="value", aggfunc="last")


def _last_step(run: Run, source: str, kind: str | None) -> int | None:
    """Last step with per-class rows of ``source``/``kind``."""
    df = run.per_class
    steps = df.loc[(df["source"] == source) & (df["kind"] == kind), "step"]
    return int(steps.max()) if len(steps) else None


def _bar_frame(runs, labels, source, kinds, subset: str = "all") -> pd.DataFrame:
    """Long frame (class position, run, metric, value) of the last per-class rows per run."""
    steps = [_last_step(r, source, k) for r, k in zip(runs, kinds)]
    if len({s for s in steps if s is not None}) > 1:
        labels = [f"{lab} (it. {s})" for lab, s in zip(labels, steps)]
    if len({k for k in kinds if k}) > 1:
        labels = [f"{lab} [{k}]" for lab, k in zip(labels, kinds)]
    frames = []
    for run, label, kind in zip(runs, labels, kinds):
        wide = per_class_at(run, source, kind, subset) if kind else pd.DataFrame()
        if wide.empty:
            continue
        order = [c for c in class_order(runs[0]) if c in wide.index]
        for metric in ("recall", "precision"):
            undefined = wide.loc[order, UNDEFINED_IF_ZERO[metric]].to_numpy() == 0
            frames.append(pd.DataFrame({"position": range(len(order)), "run": label,
                                        "metric": metric,
                                        "value": np.where(undefined, np.nan,
                                                          wide.loc[order, metric].to_numpy())}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _thin_ticks(ax, labels: Sequence[str]) -> None:
    """Label at most MAX_TICKS x ticks."""
    every = max(1, math.ceil(len(labels) / MAX_TICKS))
    ticks = list(range(0, len(labels), every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], fontsize=10)


def _move_legend_outside(fig: Figure, ax, remove: bool = False, where: str = "upper") -> None:
    """Replace ``ax``'s legend by one figure legend outside the axes (or just drop it)."""
    handles, names = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if not remove and handles:
        columns = max(1, int(fig.get_figwidth() // 3))  # about 3 inches per entry: no cut
        fig.legend(handles, names, loc=f"outside {where} center",
                   ncols=min(columns, len(names)), fontsize=9, frameon=False)


SUBSET_WORDS = {"all": "all, confident or not", "confident": "confident only: mask = 1, "
                "the ones the unlabeled loss uses"}


def plot_per_class_bars(runs: Sequence[Run], labels: Sequence[str], source: str,
                        out_dir: Path, stem: str, subset: str = "all") -> FigureFile | None:
    """Recall (top) and precision (bottom) per class, head to tail, one hue per run; for
    pseudo-labels, all of them or only the confident ones (``subset``), as the title says."""
    if source == "pseudo":
        kinds = [pseudo_kind(r) for r in runs]
        used = {k for k in kinds if k}
        kind = f"{used.pop()}, " if len(used) == 1 else ""
        title = f"Pseudo-labels ({kind}{SUBSET_WORDS[subset]})"
    else:
        kinds, title = ["prediction"] * len(runs), f"{source.capitalize()} predictions"
    data = _bar_frame(runs, labels, source, kinds, subset)
    if data.empty:
        return None
    k = int(data["position"].max()) + 1
    fig, axes = _figure(_class_axis_width(k, len(runs)), 6.4, 2)
    ticks = class_tick_labels(runs[0], class_order(runs[0]))[:k]
    for ax, metric in zip(axes[:, 0], ("recall", "precision")):
        sns.barplot(data=data[data["metric"] == metric], x="position", y="value", hue="run",
                    hue_order=list(pd.unique(data["run"])),
                    errorbar=None, palette="colorblind", ax=ax)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric.capitalize())
        ax.set_xlabel("class (labeled count), head \u2192 tail")
        _thin_ticks(ax, ticks)
        _move_legend_outside(fig, ax, remove=metric == "recall", where="lower")
    when = "last interval" if source == "pseudo" else "last evaluation"
    fig.suptitle(_wrap(f"{title}: per-class recall and precision, {when}"
                       + " (no bar: undefined)",
                       _class_axis_width(k, len(runs))), fontsize=11)
    return FigureFile(f"{title}: per-class recall and precision",
                      *save_figure(fig, out_dir, stem))


def _class_axis_width(k: int, runs: int) -> float:
    """Figure width (inches) of a per-class bar chart: narrow enough that every class's
    label stays readable when a phone shrinks the figure to its width."""
    return min(24.0, max(6.5, 0.42 * k * max(1, runs) ** 0.5 + 1.5))


def _recall_grid(df: pd.DataFrame, kind: str | None) -> pd.DataFrame:
    """Class x step recall of ``kind`` pseudo-labels; NaN where a class had no samples."""
    df = df[(df["source"] == "pseudo") & (df["kind"] == kind) & (df["subset"] == "all")]
    if df.empty:
        return pd.DataFrame()
    grid = {m: df[df["metric"] == m].pivot_table(index="class", columns="step", values="value",
                                                 aggfunc="last") for m in ("recall", "support")}
    return grid["recall"].where(grid["support"].reindex_like(grid["recall"]) > 0)


def pseudo_kinds(run: Run) -> list[str]:
    """Logged pseudo-label kinds in the order linear, semantic, final."""
    kinds = set(run.per_class.loc[run.per_class["source"] == "pseudo", "kind"])
    return [k for k in PSEUDO_KINDS if k in kinds]


def plot_pseudo_heatmap(run: Run, label: str, out_dir: Path, stem: str) -> FigureFile | None:
    """Class x step heatmaps of pseudo-label recall over training, one panel per kind
    (linear, semantic, final) on one colour scale."""
    grids = {k: _recall_grid(run.per_class, k) for k in pseudo_kinds(run)}
    grids = {k: g for k, g in grids.items() if not g.empty}
    if not grids:
        return None
    order = [c for c in class_order(run) if c in next(iter(grids.values())).index]
    names = [t.replace("\n", " ") for t in class_tick_labels(run, order)]
    steps = sorted(set().union(*(g.columns for g in grids.values())))
    width = min(15.0, max(4.5, 2.0 + 0.08 * len(steps)) * len(grids))
    fig, axes = _figure(width, min(14.0, max(3.6, 1.8 + 0.3 * len(order))), 1, len(grids),
                        sharey=True)
    every = max(1, math.ceil(len(steps) / HEATMAP_TICKS))
    ticks = list(range(0, len(steps), every))  # the same iterations on every panel and run
    for i, (ax, (kind, grid)) in enumerate(zip(axes[0], grids.items())):
        grid = grid.reindex(index=order, columns=steps)
        grid.index = names
        ax.set_facecolor("#dddddd")  # classes without samples in an interval
        sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar=i == len(grids) - 1,
                    cbar_kws={"label": "recall"}, xticklabels=False, yticklabels=True)
        ax.set_xticks([t + 0.5 for t in ticks], [str(int(steps[t])) for t in ticks],
                      rotation=90, fontsize=8)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("class (labeled count)" if i == 0 else "")
    title = f"{label}: recall of all pseudo-labels (confident or not) over training"
    fig.suptitle(_wrap(title, width), fontsize=11)
    return FigureFile(title, *save_figure(fig, out_dir, stem))


def _wrap(text: str, width_in: float, points: float = 11) -> str:
    """Wrap a title to the figure's width (about 1.9 characters per inch per 10 pt)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 120 / points))))


def plot_confusion(run: Run, label: str, out_dir: Path, stem: str) -> FigureFile | None:
    """Row-normalised test confusion matrix of the last evaluation (confusion_test.npy)."""
    cm = run.confusion_test
    if cm is None or cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.sum() == 0:
        return None
    k = cm.shape[0]
    order = class_order(run) if run.num_classes == k else list(range(k))
    names = run.class_names if run.num_classes == k else [str(i) for i in range(k)]
    ticks = [names[c] for c in order]
    cm = cm[np.ix_(order, order)].astype(float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(14.0, max(5.0, 0.45 * k + 2))
    fig, axes = _figure(size + 1, size)
    sns.heatmap(norm, vmin=0, vmax=1, cmap="Blues", square=True, ax=axes[0, 0],
                annot=k <= 12, fmt=".2f", annot_kws={"fontsize": 7},
                xticklabels=ticks if k <= MAX_TICKS else "auto",
                yticklabels=ticks if k <= MAX_TICKS else "auto",
                cbar_kws={"label": "fraction of true class"})
    axes[0, 0].set_xlabel("predicted class")
    axes[0, 0].set_ylabel("true class (head \u2192 tail)")
    title = f"{label}: test confusion matrix (last evaluation, rows normalised)"
    axes[0, 0].set_title(title, fontsize=10)
    return FigureFile(title, *save_figure(fig, out_dir, stem))


def shown_kinds(run: Run) -> list[tuple[str, str]]:
    """(kind, legend name) of the pseudo-labels to compare; "linear" is folded into "final"
    when both are the same labels (an algorithm without a refiner)."""
    kinds = pseudo_kinds(run)
    if {"linear", "final"} <= set(kinds):
        lin, fin = per_class_at(run, "pseudo", "linear"), per_class_at(run, "pseudo", "final")
        if lin.shape == fin.shape and np.allclose(lin.to_numpy(), fin.to_numpy()):
            return [("final", "final (= linear)")]
    return [(k, k) for k in kinds]


def _kinds_frame(runs: Sequence[Run], labels: Sequence[str]) -> pd.DataFrame:
    """Long frame (position, series, metric, value): last per-class recall and precision of
    each run's linear / semantic / final pseudo-labels, classes head to tail."""
    frames = []
    for run, label in zip(runs, labels):
        for kind, name in shown_kinds(run):
            wide = per_class_at(run, "pseudo", kind)
            order = [c for c in class_order(runs[0]) if c in wide.index]
            series = name if len(runs) == 1 else f"{label}: {name}"
            for metric in ("recall", "precision"):
                undefined = wide.loc[order, UNDEFINED_IF_ZERO[metric]].to_numpy() == 0
                values = np.where(undefined, np.nan, wide.loc[order, metric].to_numpy())
                frames.append(pd.DataFrame({"position": range(len(order)), "series": series,
                                            "metric": metric, "value": values}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


UNDEFINED_IF_ZERO = {"precision": "predicted", "recall": "support"}


def plot_pseudo_kinds(runs: Sequence[Run], labels: Sequence[str], out_dir: Path,
                      stem: str) -> FigureFile | None:
    """DASO Fig. 1 style: per-class recall (top) and precision (bottom) of the linear,
    semantic and final pseudo-labels of every run in the same axes, head to tail."""
    data = _kinds_frame(runs, labels)
    if data.empty:
        return None
    k = int(data["position"].max()) + 1
    hues = list(pd.unique(data["series"]))
    fig, axes = _figure(min(24.0, max(7.0, 0.22 * k * len(hues) ** 0.6 + 2.5)), 7.0, 2)
    ticks = class_tick_labels(runs[0], class_order(runs[0]))[:k]
    for ax, metric in zip(axes[:, 0], ("recall", "precision")):
        sns.barplot(data=data[data["metric"] == metric], x="position", y="value",
                    hue="series", hue_order=hues, errorbar=None, palette=_kind_palette(hues),
                    ax=ax)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"pseudo-label {metric}")
        ax.set_xlabel("class (labeled count), head \u2192 tail")
        _thin_ticks(ax, ticks)
        _move_legend_outside(fig, ax, remove=metric == "recall", where="lower")
    step = ", ".join(sorted({str(_last_step(r, "pseudo", "final") or _last_step(
        r, "pseudo", "linear")) for r in runs}))
    fig.suptitle(_wrap(f"All pseudo-labels (confident or not) per class: linear vs semantic "
                       f"vs final (interval ending at iteration {step}; undefined values left "
                       "out)", fig.get_figwidth()), fontsize=11)
    return FigureFile("All pseudo-labels (confident or not) per class: linear vs semantic vs "
                      "final",
                      *save_figure(fig, out_dir, stem))


def _kind_palette(hues: Sequence[str]) -> list:
    """One colour family per run (blues, oranges, ...), shades for linear/semantic/final."""
    families = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys"]
    runs = list(dict.fromkeys(h.rsplit(": ", 1)[0] if ": " in h else "" for h in hues))
    shades = {"linear": 0.45, "semantic": 0.65, "final": 0.9}
    colours = []
    for h in hues:
        run, _, kind = h.rpartition(": ") if ": " in h else ("", "", h)
        cmap = sns.color_palette(families[runs.index(run) % len(families)], as_cmap=True)
        colours.append(cmap(shades.get(kind.split(" ")[0], 0.9)))
    return colours


def _refiner_frame(run: Run) -> pd.DataFrame:
    """Long frame (step, class, metric, value) of the refiner's per-class state."""
    df = run.per_class
    df = df[(df["source"] == "refiner") & df["metric"].isin(REFINER_STATE)]
    return df[["step", "class", "metric", "value"]]


def plot_refiner_state(run: Run, label: str, out_dir: Path, stem: str) -> FigureFile | None:
    """DASO's m_hat (distribution of final pseudo-labels) and blend weights v per class over
    training; the dashed line marks the end of the warm-up (blending starts there)."""
    data = _refiner_frame(run)
    if data.empty:
        return None
    order = [c for c in class_order(run) if c in set(data["class"])]
    names = [t.replace("\n", " ") for t in class_tick_labels(run, order)]
    data = data.assign(name=data["class"].map(dict(zip(order, names))))
    fig, axes = _figure(12, 4.2, 1, 2)
    palette = dict(zip(names, sns.color_palette("viridis_r", len(names))))
    warmup = run.cfg("pseudo.warmup_iters")
    for ax, metric, text in zip(axes[0], REFINER_STATE, (
            "m\u0302: share of final pseudo-labels", "v: blend weight of the semantic label")):
        sns.lineplot(data=data[data["metric"] == metric], x="step", y="value", hue="name",
                     hue_order=names, palette=palette, ax=ax, legend=metric == "m_hat",
                     marker="o" if data["step"].nunique() < 30 else None)
        if isinstance(warmup, int | float) and 0 < warmup <= data["step"].max():
            ax.axvline(warmup, color="0.4", linestyle="--", linewidth=1)
        ax.set_title(text, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(0, None)
    if len(names) <= MAX_LEGEND:
        handles, names_ = axes[0, 0].get_legend_handles_labels()
        axes[0, 0].get_legend().remove()
        fig.legend(handles, names_, loc="outside right upper", fontsize=8, frameon=False,
                   title="class, head \u2192 tail", title_fontsize=8)
    elif axes[0, 0].get_legend() is not None:
        axes[0, 0].get_legend().remove()
    title = f"{label}: DASO m\u0302 and blend weights v per class over training"
    fig.suptitle(_wrap(title + (" (dashed: end of warm-up)" if warmup else ""), 12),
                 fontsize=11)
    return FigureFile(title, *save_figure(fig, out_dir, stem))


MAX_LEGEND = 20


def _mask_frame(runs: Sequence[Run], labels: Sequence[str]) -> pd.DataFrame:
    """Long frame (position, run, by, value): share of each class's final pseudo-labels
    that pass the threshold (by pseudo-label class) and of each true class's unlabeled
    images that get a confident pseudo-label (by true class), at the last interval."""
    frames = []
    for run, label in zip(runs, labels):
        kind = pseudo_kind(run)
        every, conf = (per_class_at(run, "pseudo", kind, s) if kind else pd.DataFrame()
                       for s in ("all", "confident"))
        if every.empty or conf.empty:
            continue
        order = [c for c in class_order(runs[0]) if c in every.index and c in conf.index]
        for by, col in (("pseudo-label class", "predicted"), ("true class", "support")):
            den = every.loc[order, col].to_numpy()
            value = np.where(den > 0, conf.loc[order, col].to_numpy() / np.maximum(den, 1),
                             np.nan)
            frames.append(pd.DataFrame({"position": range(len(order)), "run": label,
                                        "by": by, "value": value}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_mask_rate(runs: Sequence[Run], labels: Sequence[str], out_dir: Path,
                   stem: str) -> FigureFile | None:
    """Per-class mask rate: how many pseudo-labels of each class pass the threshold."""
    data = _mask_frame(runs, labels)
    if data.empty:
        return None
    k = int(data["position"].max()) + 1
    fig, axes = _figure(min(24.0, max(7.0, 0.45 * k * max(1, len(runs)) ** 0.5 + 2)), 6.4, 2)
    ticks = class_tick_labels(runs[0], class_order(runs[0]))[:k]
    hue_order = [lab for lab in labels if lab in set(data["run"])]
    for ax, by in zip(axes[:, 0], ("pseudo-label class", "true class")):
        sns.barplot(data=data[data["by"] == by], x="position", y="value", hue="run",
                    hue_order=hue_order, errorbar=None, palette="colorblind", ax=ax)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("mask rate")
        ax.set_title("share of the pseudo-labels of each class above the threshold"
                     if by == "pseudo-label class" else
                     "share of each true class's unlabeled images with a confident label",
                     fontsize=10)
        ax.set_xlabel(f"{by} (labeled count), head \u2192 tail")
        _thin_ticks(ax, ticks)
        _move_legend_outside(fig, ax, remove=by == "pseudo-label class", where="lower")
    fig.suptitle("Mask rate per class (final pseudo-labels, last interval)", fontsize=11)
    return FigureFile("Mask rate per class", *save_figure(fig, out_dir, stem))


def _accuracy_frame(runs: Sequence[Run], labels: Sequence[str]) -> pd.DataFrame:
    """Long frame (step, run, split, metric, value) of valid/test top1 and balanced acc."""
    frames = []
    for run, label in zip(runs, labels):
        for split in ("test", "valid"):
            for metric in ("top1", "balanced_acc"):
                s = run.split_series(split, metric)
                if len(s):
                    frames.append(pd.DataFrame({"step": s.index, "value": 100 * s.to_numpy(),
                                                "run": label, "split": split,
                                                "metric": metric}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _same_metrics(data: pd.DataFrame) -> bool:
    """True when top-1 and balanced accuracy are the same at every logged point (a balanced
    evaluation set: the same number of images per class)."""
    keys = ["run", "split", "step"]
    top1 = data[data["metric"] == "top1"].set_index(keys)["value"]
    bal = data[data["metric"] == "balanced_acc"].set_index(keys)["value"]
    return bool(len(top1) and top1.index.equals(bal.index)
                and np.allclose(top1.to_numpy(), bal.reindex(top1.index).to_numpy()))


SPLIT_STYLE = {"test": "-", "valid": "--"}


def plot_accuracy(runs: Sequence[Run], labels: Sequence[str], out_dir: Path,
                  stem: str) -> FigureFile | None:
    """Top-1 and balanced accuracy (%) over iterations: colour = run, line style = split;
    one panel when both are the same number (a balanced test set), and says so."""
    data = _accuracy_frame(runs, labels)
    if data.empty:
        return None
    same = _same_metrics(data)
    panels = [("top1", "top-1 = balanced accuracy (balanced set)")] if same else [
        ("top1", "top-1 accuracy"), ("balanced_acc", "balanced accuracy")]
    fig, axes = _figure(6.5 * len(panels) + 0.5, 4.6, 1, len(panels))
    hue_order = [lab for lab in labels if lab in set(data["run"])]
    colours = dict(zip(hue_order, sns.color_palette("colorblind", len(hue_order))))
    splits = [s for s in ("test", "valid") if s in set(data["split"])]
    for ax, (metric, name) in zip(axes[0], panels):
        part = data[data["metric"] == metric]
        for (label, split), rows in part.groupby(["run", "split"], sort=False):
            ax.plot(rows["step"], rows["value"], color=colours[label],
                    linestyle=SPLIT_STYLE.get(split, ":"),
                    marker="o" if rows["step"].nunique() < 30 else None, markersize=3)
        ax.set_title(name if len(splits) > 1 else f"{name}, {splits[0]}", fontsize=11)
        ax.set_xlabel("iteration")
        ax.set_ylabel("%")
    handles = [Line2D([], [], color=colours[lab], linewidth=2, label=lab) for lab in hue_order]
    if len(splits) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=SPLIT_STYLE[s], label=s)
                    for s in splits]
    fig.legend(handles=handles, loc="outside lower center", fontsize=9, frameon=False,
               ncols=min(len(handles), 3))
    title = "Accuracy over iterations" + (
        " (top-1 = balanced accuracy: the evaluation set is balanced)" if same else "")
    return FigureFile(title, *save_figure(fig, out_dir, stem))


def make_figures(runs: Sequence[Run], out_dir: str | os.PathLike,
                 labels: Sequence[str] | None = None) -> list[FigureFile]:
    """All figures for ``runs`` (skipping those without data) saved in ``out_dir``."""
    out = Path(out_dir)
    labels = list(labels) if labels is not None else run_labels(runs)
    figs = [plot_accuracy(runs, labels, out, "accuracy"),
            plot_per_class_bars(runs, labels, "test", out, "per_class_test"),
            plot_per_class_bars(runs, labels, "pseudo", out, "per_class_pseudo"),
            plot_per_class_bars(runs, labels, "pseudo", out, "per_class_pseudo_confident",
                                "confident") if _confident_matters(runs) else None,
            plot_pseudo_kinds(runs, labels, out, "pseudo_kinds"),
            plot_mask_rate(runs, labels, out, "mask_rate")]
    for i, (run, label) in enumerate(zip(runs, labels)):
        for fig in (plot_pseudo_heatmap(run, label, out, f"run{i}_pseudo_recall_heatmap"),
                    plot_refiner_state(run, label, out, f"run{i}_daso_state"),
                    plot_confusion(run, label, out, f"run{i}_confusion_test")):
            if fig is not None:
                fig.run = i
                figs.append(fig)
    return [f for f in figs if f is not None]


def _confident_matters(runs: Sequence[Run]) -> bool:
    """Whether the confident pseudo-labels look different enough from all of them to be
    plotted too (see ``findings.confident_differs``)."""
    from imbssl.diagnostics.findings import confident_differs

    return any(confident_differs(r) for r in runs)


def make_plots(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Read the run folders and save every figure as PNG and SVG; returns the files."""
    runs = [read_run(d) for d in run_dirs]
    return [p for f in make_figures(runs, out_dir) for p in (f.png, f.svg)]
