import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from imbssl.diagnostics.metrics import (
    PER_CLASS_COLUMNS,
    PER_CLASS_METRICS,
    classification_metrics,
    confusion_to_metrics,
    format_per_class_table,
    median_of_last,
    per_class_rows,
)

K = 5


def _cases():
    """(name, y_true, y_pred): random, a class never predicted, a class absent from y_true."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, K, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, K, 200))
    never_pred = np.where(y_pred == 3, 0, y_pred)
    absent_true = np.where(y_true == 4, 1, y_true)
    return [("random", y_true, y_pred), ("never_predicted", y_true, never_pred),
            ("absent_from_true", absent_true, y_pred)]


def _sklearn(y_true, y_pred):
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(K),
                                                 zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(y_true, y_pred)
    return {"precision": p, "recall": r, "f1": f, "support": s, "top1": accuracy_score(
        y_true, y_pred), "balanced_acc": bal,
        "confusion": confusion_matrix(y_true, y_pred, labels=range(K)),
        "predicted": np.bincount(y_pred, minlength=K)}


@pytest.mark.parametrize("name,y_true,y_pred", _cases(), ids=[c[0] for c in _cases()])
def test_classification_metrics_match_sklearn(name, y_true, y_pred):
    ours, ref = classification_metrics(y_true, y_pred, K), _sklearn(y_true, y_pred)
    for key in ("precision", "recall", "f1", "support", "predicted", "confusion"):
        np.testing.assert_allclose(ours[key], ref[key], err_msg=key)
    assert ours["top1"] == pytest.approx(ref["top1"])
    assert ours["balanced_acc"] == pytest.approx(ref["balanced_acc"])


def test_special_cases_are_exercised():
    _, (_, _, never_pred), (_, absent_true, _) = _cases()
    assert 3 not in never_pred and 4 not in absent_true
    assert classification_metrics(absent_true, never_pred, K)["precision"][3] == 0.0


@pytest.mark.parametrize("name,y_true,y_pred", _cases(), ids=[c[0] for c in _cases()])
def test_confusion_to_metrics_equals_direct(name, y_true, y_pred):
    cm = confusion_matrix(y_true, y_pred, labels=range(K))
    ours, ref = confusion_to_metrics(cm), _sklearn(y_true, y_pred)
    for key in ("precision", "recall", "f1", "support", "predicted"):
        np.testing.assert_allclose(ours[key], ref[key], err_msg=key)
    assert ours["balanced_acc"] == pytest.approx(ref["balanced_acc"])
    assert ours["top1"] == pytest.approx(ref["top1"])


def test_hand_computed_example():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 1], 3)
    np.testing.assert_allclose(m["precision"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(m["recall"], [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(m["predicted"], [1, 4, 0])
    assert m["top1"] == pytest.approx(0.6)
    assert m["balanced_acc"] == pytest.approx(0.5)


def test_empty_and_invalid_inputs():
    m = confusion_to_metrics(np.zeros((3, 3)))
    assert math.isnan(m["top1"]) and math.isnan(m["balanced_acc"])
    np.testing.assert_array_equal(m["precision"], 0.0)
    with pytest.raises(ValueError):
        classification_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 3)


def test_per_class_rows_tidy_format():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3)
    rows = per_class_rows(500, "test", "prediction", "all", m, ["a", "b", "c"])
    assert len(rows) == 3 * len(PER_CLASS_METRICS)
    assert all(tuple(r) == PER_CLASS_COLUMNS for r in rows)
    row = next(r for r in rows if r["class"] == 1 and r["metric"] == "recall")
    assert row == {"step": 500, "source": "test", "kind": "prediction", "subset": "all",
                   "class": 1, "class_name": "b", "metric": "recall", "value": 0.5}
    assert per_class_rows(0, "test", "prediction", "all", m)[0]["class_name"] == "0"


def test_median_of_last():
    assert median_of_last(range(1, 26)) == pytest.approx(15.5)  # median of 6..25
    assert median_of_last([3.0, 1.0, 2.0]) == 2.0
    assert median_of_last([1, 2, 3, 4], n=2) == 3.5
    assert math.isnan(median_of_last([]))


def test_format_per_class_table():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3)
    text = format_per_class_table(m, ["plane", "car", "bird"], [100, 10, 1])
    lines = text.splitlines()
    assert "precision" in lines[0] and "labeled" in lines[0]
    assert lines[2].split() == ["plane", "100", "1.0000", "1.0000", "1.0000", "1"]
    assert lines[-1] == "top1 75.00%  balanced_acc 83.33%"
    assert len({len(line) for line in lines[:-1]}) == 1  # fixed width
