"""analysis/official_daso.py: an official DASO run's logs -> imbssl's run-folder records.

The official-format log is generated here, in the layout of the official code's output
(github.com/ytaek-oh/daso at 3541a6c: lib/utils/writer.py JSONWriter lines with
``iteration``, ``test/top1`` and ``test_classwise/<c>`` in %, ``train/loss_*``;
lib/engine/defaults.py's ``config.yaml`` dump) and of the runner's instrument.jsonl, so no
official code is needed.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "analysis"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "analysis" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def conv():
    return _load("official_daso")


OFFICIAL_CFG = {
    "ALGORITHM": {"NAME": "DASO", "CONFIDENCE_THRESHOLD": 0.95,
                  "DASO": {"PROTO_TEMP": 0.05, "DIST_TEMP": 0.3, "PRETRAIN_STEPS": 500,
                           "PL_DIST_UPDATE_PERIOD": 50, "PSA_LOSS_WEIGHT": 1.0,
                           "WITH_DIST_AWARE": True}},
    "DATASET": {"NUM_VALID": 5000, "REVERSE_UL_DISTRIBUTION": False,
                "CIFAR10": {"NUM_LABELED_HEAD": 1500, "NUM_UNLABELED_HEAD": 3000,
                            "IMB_FACTOR_L": 100, "IMB_FACTOR_UL": 1}},
    "MODEL": {"NUM_CLASSES": 10, "EMA_DECAY": 0.99, "WIDTH": 1,
              "QUEUE": {"MAX_SIZE": 256, "FEAT_DIM": 64}},
    "SOLVER": {"UNLABELED_BATCH_RATIO": 2, "BASE_LR": 0.03, "MAX_ITER": 300,
               "IMS_PER_BATCH": 32, "SGD": {"MOMENTUM": 0.9, "WEIGHT_DECAY": 0.0005,
                                            "NESTEROV": True}},
    "PERIODS": {"EVAL": 100},
    "SEED": 2,
}


def official_line(step: int, accs: list[float]) -> dict:
    """One official JSONWriter line: accuracies in %, per class and overall."""
    line = {"iteration": step, "test/top1": sum(accs) / len(accs) * 0.9 * 100,
            "valid/top1": 50.0, "train/loss_cls": 1.0, "train/loss_cons": 0.25,
            "train/loss_assign": 2.0, "train/total_loss": 3.25, "misc/lr": 0.03}
    line.update({f"test_classwise/{c}": a * 100 for c, a in enumerate(accs)})
    line.update({f"valid_classwise/{c}": 50.0 for c in range(10)})
    return line


def diag(counts: list[int]) -> list[list[int]]:
    """A confusion matrix with counts[c] right and one error per class into class 0."""
    k = len(counts)
    conf = [[0] * k for _ in range(k)]
    for c, n in enumerate(counts):
        conf[c][c] += n
        conf[c][0] += 1
    return conf


@pytest.fixture
def official_run(tmp_path):
    run = tmp_path / "official-fixmatch_daso-seed2"
    out = run / "official_output" / "DASO_cifar10_l_1500_100_ul_3000_1_seed_2"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(OFFICIAL_CFG))
    accs = {100: [0.5] * 10, 200: [0.6] * 10, 300: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2,
                                                     0.1, 0.0]}
    (out / "metrics.json").write_text("".join(json.dumps(official_line(s, a)) + "\n"
                                              for s, a in accs.items()))
    (run / "official_output" / "done.json").write_text(
        json.dumps({"start_iter": 0, "wall_s": 9.0, "cpu_s": 8.0}))
    instrument = []
    for step in range(50, 301, 50):
        instrument.append({"step": step, "kind": "train", "mask_ratio": step / 1000,
                           "step_wall_s": 0.5, "step_cpu_s": 0.4})
        if step % 100 == 0:
            instrument.append({"step": step, "kind": "pseudo",
                               "confusion": {"linear": diag([3] * 10),
                                             "final": diag(list(range(10)))},
                               "m_hat": [0.1] * 10})
    (run / "instrument.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instrument))
    (run / "run_attempts.jsonl").write_text(json.dumps(
        {"start_iter": 0, "official_commit": "3541a6c452f895056f5fdac440b5d0c557dea9f0",
         "git_commit": "abc", "num_threads": 1, "labeled_counts": [1500] + [15] * 9,
         "unlabeled_counts": [3000] * 10,
         "same_images_as_imbssl": {"labeled": True, "unlabeled": True}}) + "\n")
    return run


def test_convert_writes_imbssl_records(conv, official_run):
    summary = conv.convert_run(official_run)
    rows = [json.loads(line) for line in (official_run / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in tests] == [100, 200, 300]
    # balanced accuracy: the mean of the official per-class accuracies, as a fraction
    assert tests[-1]["balanced_acc"] == pytest.approx(0.45)
    assert tests[-1]["top1"] == pytest.approx(0.45 * 0.9)
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert train[150]["mask/ratio"] == pytest.approx(0.15)
    assert train[300]["loss/total"] == pytest.approx(3.25)
    assert train[300]["loss/align"] == pytest.approx(2.0)
    assert summary["status"] == "finished" and summary["step"] == 300
    assert summary["final"]["test/balanced_acc"] == pytest.approx(0.45)
    assert summary["median_last5"]["test/balanced_acc"] == pytest.approx(0.5)
    with open(official_run / "per_class.csv", newline="") as fh:
        pc = list(csv.DictReader(fh))
    rec = {(r["source"], r["kind"], r["metric"], int(r["class"])): float(r["value"])
           for r in pc if r["step"] == "300"}
    assert rec[("test", "prediction", "recall", 0)] == pytest.approx(0.9)
    assert rec[("test", "prediction", "recall", 9)] == pytest.approx(0.0)
    # final pseudo-labels: class 3 has 3 right of 4 (one error into class 0)
    assert rec[("pseudo", "final", "recall", 3)] == pytest.approx(3 / 4)
    # class 0's precision: 0 right of the 10 errors sent to it plus its own 0 + 1
    assert rec[("pseudo", "final", "precision", 0)] == pytest.approx(1 / 10)
    assert rec[("refiner", "daso", "m_hat", 5)] == pytest.approx(0.1)
    assert ("pseudo", "semantic", "recall", 0) not in rec  # no semantic labels logged
    cfg = yaml.safe_load((official_run / "config.yaml").read_text())
    assert cfg["code"] == "official" and cfg["pseudo"]["name"] == "daso"
    assert cfg["dataset"]["gamma_u"] == 1.0 and cfg["dataset"]["split_protocol"] == "official_daso"
    assert cfg["pseudo"]["warmup_iters"] == 500 and cfg["seed"] == 2
    meta = json.loads((official_run / "meta.json").read_text())
    assert meta["official_commit"].startswith("3541a6c") and meta["resumed"] is False


def test_converted_run_goes_through_the_mini_aggregation(conv, official_run):
    conv.convert_run(official_run)
    mini = _load("benchmark_cifar_mini")
    rec = mini.read_record(official_run)
    assert rec["method"] == "fixmatch+daso" and rec["setting"] == "uniform"
    assert rec["bal_acc_final"] == pytest.approx(0.45)
    assert rec["pseudo_final_recall"][3] == pytest.approx(0.75)


def test_comparison_reads_both_codes(conv, official_run, tmp_path):
    conv.convert_run(official_run)
    compare = _load("official_daso_compare")
    rec = compare.read_run(official_run)
    assert rec["code"] == "official" and rec["method"] == "fixmatch_daso" and rec["seed"] == 2
    assert rec["mask_after_warmup"] is None  # nothing logged after step 500 here
    assert rec["mask_windows"][0] is None
    md = compare.write_comparison(official_run.parent, tmp_path / "out")
    text = md.read_text()
    assert "Runs finished: 1 of 12" in text
    assert (tmp_path / "out" / "official_side_by_side.png").is_file()


def test_running_official_run_is_not_finished(conv, official_run):
    (official_run / "official_output" / "done.json").unlink()
    assert conv.convert_run(official_run)["status"] == "running"


def test_convert_without_official_output_is_a_clear_error(conv, tmp_path, capsys):
    assert conv.main(["--convert", str(tmp_path / "nothing")]) == 2
    assert "no official_output" in capsys.readouterr().err


def test_runner_refuses_a_folder_that_is_not_the_pinned_checkout(tmp_path, capsys):
    run = _load("official_daso_run")
    (tmp_path / "lib" / "algorithm").mkdir(parents=True)
    (tmp_path / "lib" / "algorithm" / "daso.py").write_text("# not the official file\n")
    args = ["--official", str(tmp_path), "--method", "fixmatch", "--seed", "0",
            "--run-dir", str(tmp_path / "run")]
    assert run.main(args) == 2
    assert "differs from commit 3541a6c452" in capsys.readouterr().err
    assert run.main(args[:1] + [str(tmp_path / "missing")] + args[2:]) == 2
    assert "not a checkout" in capsys.readouterr().err


def test_runner_drops_log_lines_written_after_the_checkpoint(tmp_path):
    run = _load("official_daso_run")
    path = tmp_path / "metrics.json"
    path.write_text("".join(json.dumps({"iteration": s}) + "\n" for s in (100, 200, 300))
                    + "{broken\n")
    run.truncate_jsonl(path, "iteration", 200)
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [100, 200]


def test_queue_trains_imbssl_on_the_official_split(tmp_path):
    queue = _load("official_daso_queue")
    jobs = queue.matrix()
    assert len(jobs) == 12 and [j.name for j in jobs[:4]] == [
        "imbssl-fixmatch-seed0", "official-fixmatch-seed0", "imbssl-fixmatch_daso-seed0",
        "official-fixmatch_daso-seed0"]
    cmd = queue.command(jobs[2], tmp_path / jobs[2].name, None)
    assert "dataset.split_protocol=official_daso" in cmd and "seed=0" in cmd
    assert "experiment=mini/cifar10_lt_g100_n1500_uniform_fixmatch_daso" in cmd


def test_comparison_shows_an_official_run_still_training(official_run, tmp_path):
    compare = _load("official_daso_compare")
    (official_run / "official_output" / "done.json").unlink()  # the runner has not converted
    rec = compare.read_run(official_run)
    assert rec["finished"] is False and rec["last_step"] == 300
    assert dict(rec["bal_acc_curve"])[300] == pytest.approx(0.45)
    assert dict(rec["mask_curve"])[150] == pytest.approx(0.15)
    text = compare.write_comparison(official_run.parent, tmp_path / "out").read_text()
    assert "Runs finished: 0 of 12" in text
    assert "| official-fixmatch_daso-seed2 | 300 | 60.0 | – |" in text


def test_queue_trains_two_jobs_at_once_and_records_each(tmp_path, monkeypatch):
    queue = _load("official_daso_queue")
    jobs = queue.matrix()[:3]
    started = []

    def fake_command(job, run_dir, official):
        started.append(job.name)
        body = (f"import json, pathlib, time; d = pathlib.Path({str(run_dir)!r}); d.mkdir(); "
                "t = time.time(); time.sleep(0.5); (d / 'summary.json').write_text(json.dumps("
                "{'status': 'finished', 'span': [t, time.time()]}))")
        return [sys.executable, "-c", body]

    monkeypatch.setattr(queue, "command", fake_command)
    queue.run_jobs(jobs, tmp_path, None, parallel=2, attempts=1)
    assert started == [j.name for j in jobs]
    for j in jobs:
        assert queue.run_state(tmp_path / j.name) == "finished"
        assert json.loads((tmp_path / f"{j.name}.timing.jsonl").read_text())["exit"] == 0
    spans = [json.loads((tmp_path / j.name / "summary.json").read_text())["span"] for j in jobs]
    assert spans[1][0] < spans[0][1]  # the first two trained at the same time
    assert spans[2][0] >= min(spans[0][1], spans[1][1])  # the third waited for a free lane


def test_comparison_says_whether_a_pair_trained_at_the_same_time(tmp_path):
    compare = _load("official_daso_compare")
    rows = {"a": [{"start": "2026-12-07T10:00:00", "wall_s": 600, "user_s": 1, "sys_s": 0}],
            "b": [{"start": "2026-12-07T10:05:00", "wall_s": 600, "user_s": 1, "sys_s": 0}],
            "c": [{"start": "2026-12-07T11:00:00", "wall_s": 60, "user_s": 1, "sys_s": 0}]}
    t = {}
    for name, lines in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
        t[name] = compare.timing(tmp_path / name, 2000)
    assert compare.shared_share(t["a"], t["b"]) == pytest.approx(0.5)
    assert compare.shared_share(t["a"], t["c"]) == 0.0
    assert compare.shared_share(t["a"], None) is None
