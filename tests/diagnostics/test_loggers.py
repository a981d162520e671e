"""logger=wandb / logger=mlflow write what they claim: read back offline with their own APIs."""
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from imbssl.diagnostics.logfile import RunLog, read_per_class
from imbssl.diagnostics.loggers import (
    TrackedRunLog,
    check_logger,
    open_run_log,
    scalar_items,
)
from imbssl.diagnostics.metrics import classification_metrics, per_class_rows
from imbssl.errors import UserError

NAMES = ["zero", "one", "two"]


def _config(name: str, **logger) -> OmegaConf:
    return OmegaConf.create({
        "seed": 3, "dataset": {"name": "digits_lt", "gamma_l": 10},
        "logger": {"name": name, "project": "imbssl-test", "run_name": "", "mode": "offline",
                   "tracking_uri": "", **logger}})


def _evaluation(step: int, shift: int) -> tuple[list[dict], list[dict]]:
    """Test rows and pseudo-label rows of one evaluation (the trainer appends both)."""
    y = [0, 0, 1, 1, 2, 2]
    test = classification_metrics(y, [0, 0, 1, (1 + shift) % 3, 2, 0], 3)
    pseudo = classification_metrics(y, [0, 1, 1, 1, 2, shift % 3], 3)
    return (per_class_rows(step, "test", "prediction", "all", test, NAMES),
            per_class_rows(step, "pseudo", "final", "all", pseudo, NAMES))


def _feed(log: RunLog) -> None:
    """What the trainer writes over two evaluations, then the final summary."""
    for step, shift in ((10, 0), (20, 1)):
        log.append_metrics({"step": step, "split": "train", "loss/total": 2.0 / step,
                            "lr": 0.03})
        log.append_metrics({"step": step, "split": "test", "top1": step / 40,
                            "balanced_acc": step / 50})
        test_rows, pseudo_rows = _evaluation(step, shift)
        log.append_per_class(test_rows)
        log.append_per_class(pseudo_rows)
        log.append_metrics({"step": step, "split": "pseudo", "pseudo/final/all/acc": 0.5})
        log.write_summary({"status": "running", "step": step})
    log.write_summary({"status": "finished", "step": 20,
                       "final": {"test/top1": 0.5, "test/balanced_acc": 0.4}})


def test_scalar_names():
    assert scalar_items({"step": 5, "split": "test", "top1": 0.5, "flag": True}) == {
        "test/top1": 0.5}
    assert scalar_items({"step": 5, "split": "pseudo", "pseudo/final/all/acc": 1}) == {
        "pseudo/final/all/acc": 1.0}


def test_logger_none_is_the_plain_run_log(tmp_path):
    log = open_run_log(tmp_path / "run", _config("none"))
    assert type(log) is RunLog
    assert check_logger(OmegaConf.create({"seed": 0})).name == "none"  # older run folders


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_package_is_one_line_naming_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(UserError) as err:
        check_logger(_config(name))
    text = str(err.value)
    assert "\n" not in text and f"pip install 'imbssl[{name}]'" in text


def test_bad_logger_settings_are_user_errors():
    with pytest.raises(UserError, match="not a tracker"):
        check_logger(_config("neptune"))
    pytest.importorskip("wandb")
    with pytest.raises(UserError, match="offline or online"):
        check_logger(_config("wandb", mode="cloud"))


# ----------------------------------------------------------------- W&B
def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks, 7-byte
    record headers crc/length/type, after the 7-byte W&B file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def _items(items) -> dict:
    """History/summary items as a dict; nested keys (a table's fields) become nested dicts."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _history(records) -> dict[int, dict]:
    """step -> {key: value} of the logged history rows."""
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.setdefault(int(r.history.step.num), {}).update(_items(r.history.item))
    return rows


def test_wandb_offline_writes_config_scalars_and_per_class_tables(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    log = open_run_log(run_dir, _config("wandb"))
    assert isinstance(log, TrackedRunLog)
    _feed(log)
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(folder / f"run-{run_id}.wandb")

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["seed"] == 3 and config["dataset"]["gamma_l"] == 10
    assert config["logger"]["name"] == "wandb" and run.display_name == "run"

    history = _history(records)
    assert history[10]["test/top1"] == 0.25 and history[20]["train/loss/total"] == 0.1
    assert history[20]["pseudo/final/all/acc"] == 0.5
    written = read_per_class(run_dir)
    for step in (10, 20):  # one table per evaluation, test and pseudo rows together
        ref = history[step]["per_class"]
        assert ref["_type"] == "table-file" and ref["nrows"] == 2 * 3 * 5
        table = json.loads((folder / "files" / ref["path"]).read_text())
        frame = pd.DataFrame(table["data"], columns=table["columns"])
        expected = written[written["step"] == step].reset_index(drop=True)
        assert list(frame.columns) == list(expected.columns)
        pd.testing.assert_series_equal(frame["value"].astype(float), expected["value"],
                                       check_names=False)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["final.test/top1"] == 0.5 and summary["status"] == "finished"
    exit_code = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_code == [0]


# ----------------------------------------------------------------- MLflow
def test_mlflow_local_store_holds_params_metrics_and_per_class_table(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    _feed(open_run_log(run_dir, _config("mlflow")))
    ids = json.loads((run_dir / "tracking.json").read_text())
    assert ids["mlflow_tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=ids["mlflow_tracking_uri"])
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["seed"] == "3" and run.data.params["dataset.gamma_l"] == "10"
    history = client.get_metric_history(run.info.run_id, "test/top1")
    assert [(m.step, m.value) for m in history] == [(10, 0.25), (20, 0.5)]
    assert run.data.metrics["pseudo/final/all/acc"] == 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "per_class.csv", "summary.json"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "per_class.csv", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (run_dir / "per_class.csv").read_bytes()
    assert artifacts and Path(run_dir / "mlartifacts").is_dir()
