import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from imbssl.diagnostics.logfile import (
    RunLog,
    is_run_dir,
    read_metrics,
    read_per_class,
    read_run,
)
from imbssl.diagnostics.metrics import PER_CLASS_COLUMNS, classification_metrics, per_class_rows


def _rows(step, source="test", kind="prediction", subset="all"):
    m = classification_metrics([0, 1, 2, 2, 1], [0, 2, 2, 2, 0], 3)
    return per_class_rows(step, source, kind, subset, m, ["cat, big", "dog", '"q"'])


def test_per_class_round_trip(tmp_path):
    log = RunLog(tmp_path)
    rows = _rows(100) + _rows(100, "pseudo", "final", "confident")
    log.append_per_class(rows[:7])
    log.append_per_class(rows[7:])
    log.append_per_class([])
    text = (tmp_path / "per_class.csv").read_text()
    assert text.count("step,source,kind") == 1
    back = read_per_class(tmp_path)
    expected = pd.DataFrame(rows, columns=list(PER_CLASS_COLUMNS))
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back["value"].dtype == np.float64 and back["step"].dtype == np.int64
    assert back.to_dict("records") == rows


def test_metrics_jsonl_and_partial_last_line(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics({"step": 1, "split": "train", "loss/total": torch.tensor(2.5),
                        "mask/ratio": np.float32(0.5)})
    log.append_metrics({"step": 10, "split": "test", "top1": 0.5, "balanced_acc": 0.25})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "split": "test", "top1": 0.')  # still being written
    df = read_metrics(tmp_path)
    assert list(df["step"]) == [1, 10]
    assert df.loc[0, "loss/total"] == 2.5 and df.loc[0, "mask/ratio"] == 0.5
    assert df.loc[1, "top1"] == 0.5


def test_rows_of_one_step_are_merged(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics({"step": 5, "split": "train", "loss/total": 1.0})
    log.append_metrics({"step": 5, "split": "train", "pseudo/final/all/acc": 0.7})
    log.append_metrics({"step": 5, "split": "train", "loss/total": 0.9})  # resumed re-log
    df = read_metrics(tmp_path)
    assert len(df) == 1
    assert df.loc[0, "loss/total"] == 0.9 and df.loc[0, "pseudo/final/all/acc"] == 0.7


def test_partial_csv_line_is_dropped(tmp_path):
    RunLog(tmp_path).append_per_class(_rows(1))
    with open(tmp_path / "per_class.csv", "a") as f:
        f.write("2,test,prediction,all,0,cat")
    assert len(read_per_class(tmp_path)) == len(_rows(1))


def test_missing_files_give_empty_frames(tmp_path):
    assert not is_run_dir(tmp_path)
    run = read_run(tmp_path)
    assert run.metrics.empty and run.per_class.empty and run.summary is None
    assert run.config == {} and run.confusion_test is None
    assert run.status == "incomplete" and run.last_step == 0
    assert math.isnan(run.median_last("test/top1"))
    assert list(run.per_class.columns) == list(PER_CLASS_COLUMNS)
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "nope")


def test_summary_and_json_are_atomic(tmp_path):
    log = RunLog(tmp_path)
    log.write_summary({"status": "running", "step": np.int64(3)})
    log.write_summary({"status": "finished", "step": 4, "final": {"test/top1": 0.5}})
    log.write_json("meta.json", {"class_names": ["a", "b"], "labeled_counts": [5, 1]})
    log.write_confusion(torch.tensor([[3, 1], [0, 2]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_test.npy", "meta.json", "summary.json"]
    run = read_run(tmp_path)
    assert run.summary == {"status": "finished", "step": 4, "final": {"test/top1": 0.5}}
    assert run.class_names == ["a", "b"] and run.labeled_counts == [5, 1]
    np.testing.assert_array_equal(run.confusion_test, [[3, 1], [0, 2]])
    assert is_run_dir(tmp_path)


def test_run_summaries(tmp_path, make_run):
    run = read_run(make_run("done", iterations=2500, eval_every=100))
    top1 = run.split_series("test", "top1")
    assert len(top1) == 25 and run.status == "finished"
    assert run.median_last("test/top1") == pytest.approx(np.median(top1.to_numpy()[-20:]))
    assert run.final_metrics()["test/top1"] == pytest.approx(top1.iloc[-1])
    stopped = read_run(make_run("stopped", stop_at=300))
    assert stopped.summary is None and stopped.last_step == 300
    assert stopped.final_metrics()["test/top1"] == pytest.approx(
        stopped.split_series("test", "top1").iloc[-1])
    assert json.loads((stopped.path / "meta.json").read_text())["seed"] == 0
