"""What a report says in words, because a plot alone does not point it out: a mask ratio that
collapses after the warm-up, classes never predicted, a balanced test set (top-1 = balanced
accuracy), and how many pseudo-labels were confident (the ones the unlabeled loss uses)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imbssl.diagnostics.logfile import Run, finite
from imbssl.diagnostics.plots import pseudo_kind

NEAR_ZERO = 0.05  # a mask ratio below 5% of the unlabeled batch counts as near zero
FALL = 2.0  # ... when it is less than half of what it was at the end of the warm-up
CONFIDENT_MATTERS = 0.10  # all vs confident pseudo-label recall/precision differ by 10 points


def _names(run: Run, classes) -> str:
    names = run.class_names
    return ", ".join(names[int(c)] if int(c) < len(names) else str(c) for c in classes)


def _last(run: Run, source: str, kind: str | None, subset: str = "all"):
    """Per-class rows (class x metric) of the last step of source/kind/subset."""
    from imbssl.diagnostics.plots import per_class_at

    return per_class_at(run, source, kind, subset) if kind else None


def warmup_iters(run: Run) -> int:
    """The pseudo-label refiner's warm-up (``pseudo.warmup_iters``), 0 when it has none."""
    value = run.cfg("pseudo.warmup_iters", 0)
    return int(value) if finite(value) and float(value) > 0 else 0


def mask_collapse(run: Run, label: str) -> str | None:
    """A sentence when the mask ratio falls to near zero after the warm-up, else None."""
    series = run.split_series("train", "mask/ratio")
    warm = warmup_iters(run)
    if not warm or series.empty:
        return None
    before, after = series[series.index <= warm], series[series.index > warm]
    if before.empty or len(after) < 3:
        return None
    level, peak = float(after.median()), float(before.iloc[-3:].max())
    if level >= NEAR_ZERO or peak < FALL * level:
        return None
    return (f"{label}: the mask ratio falls to near zero after the warm-up "
            f"(pseudo.warmup_iters = {warm}). Up to {100 * peak:.1f}% of the unlabeled images "
            f"had a confident pseudo-label at the end of the warm-up, after it a median of "
            f"{100 * level:.1f}% (lowest {100 * float(after.min()):.1f}%): the unlabeled loss "
            "then trains on almost no images.")


def never_predicted(run: Run, label: str) -> list[str]:
    """Sentences naming the classes the last test evaluation and the last interval's
    pseudo-labels never predicted."""
    out = []
    test = _last(run, "test", "prediction")
    if test is not None and not test.empty and "predicted" in test:
        zero = [c for c in test.index if test.loc[c, "predicted"] == 0]
        if zero:
            out.append(f"{label} never predicts {_names(run, zero)} at its last test "
                       "evaluation: test recall 0, precision undefined.")
    kind = pseudo_kind(run)
    pseudo = _last(run, "pseudo", kind)
    if pseudo is not None and not pseudo.empty and "predicted" in pseudo:
        zero = [c for c in pseudo.index if pseudo.loc[c, "predicted"] == 0]
        if zero:
            out.append(f"{label}: no unlabeled image got the pseudo-label "
                       f"{_names(run, zero)} in the last logging interval ({kind}).")
    return out


def confident_share(run: Run) -> tuple[float, float] | None:
    """(confident, all) pseudo-label counts of the last logged interval."""
    kind = pseudo_kind(run)
    if kind is None:
        return None
    counts = [run.split_series(split, f"pseudo/{kind}/{subset}/count")
              for subset in ("confident", "all") for split in ("pseudo", "train")]
    conf = next((s for s in counts[:2] if len(s)), None)
    every = next((s for s in counts[2:] if len(s)), None)
    if conf is None or every is None or not float(every.iloc[-1]):
        return None
    return float(conf.iloc[-1]), float(every.iloc[-1])


def confident_differs(run: Run) -> bool:
    """Whether per-class recall or precision of the confident pseudo-labels differs from
    that of all pseudo-labels by CONFIDENT_MATTERS or more for some class."""
    kind = pseudo_kind(run)
    every, conf = _last(run, "pseudo", kind), _last(run, "pseudo", kind, "confident")
    if every is None or conf is None or every.empty or conf.empty:
        return False
    for metric, den in (("recall", "support"), ("precision", "predicted")):
        if metric not in every or metric not in conf:
            continue
        both = every.index.intersection(conf.index)
        defined = (every.loc[both, den] > 0) & (conf.loc[both, den] > 0)
        diff = (every.loc[both, metric] - conf.loc[both, metric]).abs()[defined]
        if len(diff) and float(diff.max()) >= CONFIDENT_MATTERS:
            return True
    return False


def pseudo_counting(runs: Sequence[Run], labels: Sequence[str]) -> str | None:
    """Which pseudo-labels the figures count, and how many of them were confident."""
    parts = []
    for run, label in zip(runs, labels):
        share = confident_share(run)
        if share is not None:
            conf, every = share
            parts.append(f"{label} {int(conf)} of {int(every)} ({100 * conf / every:.0f}%)")
    if not parts:
        return None
    differs = any(confident_differs(r) for r in runs)
    return ("Pseudo-label figures count all pseudo-labels (every unlabeled image, "
            "confident or not) unless titled \"confident\"; only the confident ones (mask = 1) "
            "enter the unlabeled loss. Confident in the last interval: " + "; ".join(parts)
            + (". The two differ by 10 points or more for some class, so the per-class "
               "figure is shown for both." if differs else "."))


def balanced_test_set(run: Run) -> bool:
    """True when every class has the same number of test images (top-1 = balanced acc)."""
    test = _last(run, "test", "prediction")
    if test is not None and not test.empty and "support" in test:
        support = test["support"].to_numpy(dtype=float)
        return bool(len(support) and np.all(support == support[0]))
    top1, bal = run.split_series("test", "top1"), run.split_series("test", "balanced_acc")
    return bool(len(top1) and len(top1) == len(bal)
                and np.allclose(top1.to_numpy(), bal.to_numpy()))


def balanced_note(runs: Sequence[Run]) -> str | None:
    """One sentence when top-1 and balanced accuracy are the same number for every run."""
    if not runs or not all(balanced_test_set(r) for r in runs):
        return None
    return ("The test set is balanced (the same number of images per class), so top-1 "
            "accuracy equals balanced accuracy: one number is shown for both.")


def findings(runs: Sequence[Run], labels: Sequence[str]) -> list[str]:
    """Every sentence above that applies to ``runs``, most important first."""
    out = [s for r, lab in zip(runs, labels) if (s := mask_collapse(r, lab))]
    for run, label in zip(runs, labels):
        out += never_predicted(run, label)
    out += [s for s in (pseudo_counting(runs, labels), balanced_note(runs)) if s]
    return out
