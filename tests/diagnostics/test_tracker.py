import io

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from imbssl.diagnostics.metrics import classification_metrics, per_class_rows
from imbssl.diagnostics.tracker import PseudoLabelTracker

K = 4


def _batches(n_batches=3, size=32, seed=0, daso=True):
    """(logs, true) pairs with linear/final predictions and a 0/1 float mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        true = torch.randint(0, K, (size,), generator=g)
        noisy = torch.randint(0, K, (size,), generator=g)
        keep = torch.rand(size, generator=g) < 0.6
        logs = {"pseudo/linear": torch.where(keep, true, noisy),
                "pseudo/mask": (torch.rand(size, generator=g) < 0.5).float()}
        if daso:
            logs["pseudo/semantic"] = noisy
            logs["pseudo/final"] = torch.where(keep | (noisy == 0), true, noisy)
        out.append((logs, true))
    return out


def _concat(batches, key):
    return torch.cat([b[0][key] for b in batches]).numpy(), torch.cat(
        [b[1] for b in batches]).numpy()


def test_confusion_equals_sklearn_on_concatenation():
    batches = _batches()
    tracker = PseudoLabelTracker(K, "cpu")
    for logs, true in batches:
        tracker.update(logs, true)
    cms = tracker.confusion()
    assert set(cms) == {f"{k}/{s}" for k in ("linear", "semantic", "final")
                        for s in ("all", "confident")}
    mask, _ = _concat(batches, "pseudo/mask")
    for kind in ("linear", "semantic", "final"):
        pred, true = _concat(batches, f"pseudo/{kind}")
        np.testing.assert_array_equal(cms[f"{kind}/all"],
                                      confusion_matrix(true, pred, labels=range(K)))
        sel = mask == 1
        np.testing.assert_array_equal(cms[f"{kind}/confident"],
                                      confusion_matrix(true[sel], pred[sel], labels=range(K)))


def test_flush_rows_match_metrics_and_reset():
    batches = _batches()
    tracker = PseudoLabelTracker(K, "cpu")
    for logs, true in batches:
        tracker.update(logs, true)
    rows = tracker.flush(100, list("abcd"))
    pred, true = _concat(batches, "pseudo/final")
    expected = per_class_rows(100, "pseudo", "final", "all",
                              classification_metrics(true, pred, K), list("abcd"))
    got = [r for r in rows if r["kind"] == "final" and r["subset"] == "all"]
    assert got == expected
    assert {r["source"] for r in rows} == {"pseudo"}
    assert tracker.last_summary["pseudo/final/all/count"] == len(true)
    assert tracker.last_summary["pseudo/final/all/acc"] == pytest.approx(np.mean(pred == true))
    assert tracker.flush(200) == []  # reset after a flush


def test_unknown_labels_skip_the_whole_batch():
    (logs, true), (logs2, true2) = _batches(2)
    tracker = PseudoLabelTracker(K, "cpu")
    tracker.update(logs, true)
    unknown = true2.clone()
    unknown[0] = -1
    tracker.update(logs2, unknown)
    ref = PseudoLabelTracker(K, "cpu")
    ref.update(logs, true)
    for key, cm in ref.confusion().items():
        np.testing.assert_array_equal(tracker.confusion()[key], cm)
    only_unknown = PseudoLabelTracker(K, "cpu")
    only_unknown.update(logs2, torch.full_like(true2, -1))
    assert only_unknown.flush(1) == []


def test_absent_kinds_are_not_logged():
    tracker = PseudoLabelTracker(K, "cpu")
    for logs, true in _batches(daso=False):
        del logs["pseudo/mask"]
        tracker.update(logs, true)
    rows = tracker.flush(10)
    assert {(r["kind"], r["subset"]) for r in rows} == {("linear", "all")}


def test_length_mismatch_raises():
    logs, true = _batches(1)[0]
    with pytest.raises(ValueError):
        PseudoLabelTracker(K).update(logs, true[:-1])


def test_state_dict_round_trip():
    batches = _batches(4)
    a = PseudoLabelTracker(K, "cpu")
    for logs, true in batches[:2]:
        a.update(logs, true)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = PseudoLabelTracker(K, "cpu")
    b.load_state_dict(torch.load(buf))
    for logs, true in batches[2:]:
        a.update(logs, true)
        b.update(logs, true)
    assert a.flush(5) == b.flush(5)
    with pytest.raises(ValueError):
        PseudoLabelTracker(K + 1).load_state_dict(a.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_sync_on_cuda():
    tracker = PseudoLabelTracker(K, "cuda")
    batches = [({k: v.cuda() for k, v in logs.items()}, true.cuda())
               for logs, true in _batches()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for logs, true in batches:
            tracker.update(logs, true)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tracker.flush(1)


def test_negative_predictions_are_not_counted():
    """A -1 pseudo-label (DASO's semantic label before any queue fills) is no class-0 vote."""
    tracker = PseudoLabelTracker(3)
    true = torch.tensor([0, 1, 2, 0])
    tracker.update({"pseudo/semantic": torch.tensor([-1, 1, -1, 0]),
                    "pseudo/mask": torch.tensor([1.0, 1.0, 1.0, 0.0])}, true)
    conf = tracker.confusion()
    assert conf["semantic/all"].sum() == 2
    assert conf["semantic/all"][0, 0] == 1 and conf["semantic/all"][1, 1] == 1
    assert conf["semantic/confident"].sum() == 1
