"""The CPU mini protocol: its rows compose with the documented values, the three settings
share one labeled set, and analysis/benchmark_cifar_mini.py aggregates run folders as it says."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from imbssl.cli import CONFIG_DIR, compose
from imbssl.data.longtail import make_longtail_split

ROOT = Path(__file__).resolve().parents[2]
MINI = Path(CONFIG_DIR) / "experiment" / "mini"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_cifar_mini",
                                                  ROOT / "analysis" / "benchmark_cifar_mini.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_cifar_mini"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _script()


def mini_rows() -> list[str]:
    return sorted(f"mini/{p.stem}" for p in MINI.glob("*.yaml"))


def test_mini_rows_exist_for_the_matrix():
    rows = set(mini_rows())
    assert len(rows) == 1 + 3 * 4 * 2  # supervised + 3 settings x 4 algorithms x +/- DASO
    assert {job.row for job in bench.matrix()} <= rows


@pytest.mark.parametrize("row", mini_rows())
def test_mini_row_values(row):
    cfg = compose([f"experiment={row}"])
    assert cfg.model.name == "wrn16_1" and cfg.trainer.iterations == 2000
    assert cfg.trainer.batch_size == 32 and cfg.trainer.eval_interval == 100
    assert cfg.trainer.summary_last == 5
    assert (cfg.dataset.n1, cfg.dataset.m1, cfg.dataset.gamma_l) == (1500, 3000, 100)
    # the official recipe
    assert cfg.model.bn_momentum == 0.1 and cfg.model.ema_train_mode and cfg.model.ema_warmup
    assert cfg.model.ema_buffers == "average" and cfg.optim.decay_scope == "all"
    assert cfg.optim.lr == 0.03 and cfg.trainer.precision == "fp32"
    assert cfg.dataset.geometric_fill == 0
    name = row.split("/")[1]
    assert cfg.experiment_name == f"mini_{name}"
    uniform, reverse = "_uniform_" in name, "_reversed_" in name
    assert cfg.dataset.gamma_u == (1 if uniform else 100)
    assert cfg.dataset.reverse_unlabeled == reverse
    if name.endswith("_daso"):
        assert cfg.pseudo.warmup_iters == 500 and cfg.pseudo.dist_window == 50
        assert cfg.pseudo.queue_size == 256 and cfg.pseudo.proto_temperature == 0.05
        # the paper's T_dist rule: 1.5 when gamma_l = gamma_u, 0.3 for mismatched CIFAR-10
        assert cfg.pseudo.dist_temperature == (0.3 if uniform or reverse else 1.5)
    else:
        assert cfg.pseudo.name == "none"


def test_paper_row_uses_the_official_recipe():
    out = subprocess.run([sys.executable, "-m", "imbssl", "train",
                          "experiment=cifar10_lt_g100_n1500_fixmatch_daso", "--cfg", "job"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["model"]["ema_train_mode"] is True and cfg["model"]["bn_momentum"] == 0.1
    assert cfg["model"]["wrn_residual"] == "official" and cfg["optim"]["decay_scope"] == "all"


def test_the_three_settings_share_one_labeled_set():
    labels = np.repeat(np.arange(10), 5000)  # CIFAR-10's training labels, 5000 per class
    splits = [make_longtail_split(labels, 1500, 100, 3000, g, rev, 500, seed=3)
              for g, rev in ((100, False), (1, False), (100, True))]
    for s in splits[1:]:
        np.testing.assert_array_equal(s.labeled, splits[0].labeled)
        np.testing.assert_array_equal(s.valid, splits[0].valid)
    assert len(splits[0].labeled) == 3720


# ------------------------------------------------------------------ aggregation
LABELED = [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]


def make_run(root: Path, name: str, *, method: str, setting: str, seed: int, bal: float,
             final: float, recall: list[float], pseudo: dict[str, list[float]] | None = None,
             status: str = "finished") -> Path:
    run = root / name
    run.mkdir(parents=True)
    algo, _, daso = method.partition("+")
    cfg = {**yaml.safe_load((ROOT / "configs/recipe/daso_official.yaml").read_text()),
           "seed": seed, "experiment_name": f"mini_{name}",
           "dataset": {"gamma_u": 1.0 if setting == "uniform" else 100.0,
                       "reverse_unlabeled": setting == "reversed", "geometric_fill": 0},
           "algorithm": {"name": algo}, "pseudo": {"name": "daso" if daso else "none"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "meta.json").write_text(json.dumps({"git_commit": "abc1234def", "seed": seed,
                                               "labeled_counts": LABELED}))
    (run / "summary.json").write_text(json.dumps({
        "status": status, "step": 2000, "summary_last": 5,
        "final": {"test/balanced_acc": final, "test/top1": final + 0.1},
        "median_last5": {"test/balanced_acc": bal, "test/top1": bal + 0.1}}))
    lines = ["step,source,kind,subset,class,class_name,metric,value"]
    for step, scale in ((1900, 0.5), (2000, 1.0)):  # only the last evaluation counts
        lines += [f"{step},test,prediction,all,{c},c{c},recall,{r * scale}"
                  for c, r in enumerate(recall)]
        for kind, values in (pseudo or {}).items():
            lines += [f"{step},pseudo,{kind},all,{c},c{c},recall,{v * scale}"
                      for c, v in enumerate(values)]
            lines += [f"{step},pseudo,{kind},confident,{c},c{c},recall,0.0"
                      for c in range(len(values))]
    (run / "per_class.csv").write_text("\n".join(lines) + "\n")
    metrics = [{"step": 500, "split": "test", "top1": bal, "balanced_acc": bal - 0.1}]
    metrics += [{"step": s, "split": "train", "mask/ratio": s / 10000} for s in (1400, 1500, 2000)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


@pytest.fixture
def runs(tmp_path):
    r = [0.9] * 7 + [0.1, 0.2, 0.3]
    make_run(tmp_path, "a-seed0", method="fixmatch", setting="uniform", seed=0, bal=0.50,
             final=0.52, recall=r, pseudo={"linear": [0.5] * 10, "final": [0.5] * 10})
    make_run(tmp_path, "a-seed1", method="fixmatch", setting="uniform", seed=1, bal=0.60,
             final=0.62, recall=[0.9] * 7 + [0.3, 0.4, 0.5],
             pseudo={"linear": [0.7] * 10, "final": [0.7] * 10})
    make_run(tmp_path, "b-seed0", method="fixmatch+daso", setting="uniform", seed=0, bal=0.70,
             final=0.71, recall=r, pseudo={"linear": [0.1] * 10, "semantic": [0.2] * 10,
                                           "final": [0.3] * 10})
    make_run(tmp_path, "c-seed0", method="fixmatch", setting="reversed", seed=0, bal=0.4,
             final=0.4, recall=r, status="running")  # unfinished: not in the tables
    return tmp_path


def test_records_from_run_folders(runs):
    recs = {r["run"]: r for r in bench.read_records(runs)}
    assert set(recs) == {"a-seed0", "a-seed1", "b-seed0"}
    a0 = recs["a-seed0"]
    assert (a0["setting"], a0["method"], a0["seed"]) == ("uniform", "fixmatch", 0)
    assert a0["tail_classes"] == [7, 8, 9]
    assert a0["tail_recall_final"] == pytest.approx(0.2)  # last evaluation only
    assert a0["pseudo_linear_recall"] == pytest.approx([0.5] * 10)
    assert recs["b-seed0"]["method"] == "fixmatch+daso"
    assert recs["b-seed0"]["pseudo_semantic_recall"] == pytest.approx([0.2] * 10)
    assert a0["commit"] == "abc1234def" and a0["recipe"] == "daso_official"
    assert a0["bal_acc_at_500"] == pytest.approx(0.4)
    # rows logged after step 1500 cover the last 500 iterations: only the one at step 2000
    assert a0["mask_ratio_last"] == pytest.approx(0.2)


def test_method_labels():
    assert bench.setting_of({"algorithm": {"name": "supervised"},
                             "dataset": {"gamma_u": 100.0}}) == "all"
    assert bench.setting_of({"algorithm": {"name": "fixmatch"},
                             "dataset": {"gamma_u": 100.0, "reverse_unlabeled": True}}) == "reversed"
    base = {"algorithm": {"name": "fixmatch"}}
    assert bench.method_of({**base, "pseudo": {"name": "none"}}) == "fixmatch"
    assert bench.method_of({**base, "pseudo": {"name": "daso", "blend": True}}) == "fixmatch+daso"
    neutral = {"name": "daso", "blend": False, "align_weight": 0.0}
    assert bench.method_of({**base, "pseudo": neutral}) == "fixmatch+daso(neutral)"
    assert bench.method_of({**base, "pseudo": {"name": "daso", "blend_mode": "off",
                                               "align_weight": 0}}) == "fixmatch+daso(neutral)"


def test_recipe_of_names_the_recipe_and_missing_switches():
    official = yaml.safe_load((ROOT / "configs/recipe/daso_official.yaml").read_text())
    assert bench.recipe_of(official) == "daso_official"
    port = yaml.safe_load((ROOT / "configs/recipe/fixmatch_port.yaml").read_text())
    assert bench.recipe_of(port) == "fixmatch_port"
    del official["optim"]
    assert bench.recipe_of(official) == "daso_official without optim.decay_scope"
    official["model"]["bn_momentum"] = 0.5
    assert bench.recipe_of(official) == "custom"
    assert bench.recipe_of({"seed": 0}) == "custom"


def test_recipe_of_reads_a_legacy_switch_by_its_old_value():
    official = yaml.safe_load((ROOT / "configs/recipe/daso_official.yaml").read_text())
    official["dataset"]["geometric_fill"] = 128
    assert bench.recipe_of(official) == "daso_official but dataset.geometric_fill=128"
    del official["dataset"]["geometric_fill"]  # a run from before the switch: it filled 128
    assert bench.recipe_of(official) == "daso_official but dataset.geometric_fill=128"


def test_markdown_tables_mean_and_std(runs, tmp_path):
    recs = bench.read_records(runs)
    out = tmp_path / "out"
    bench.write_outputs(recs, [bench.Job("uniform", "fixmatch", 2)], out, "t")
    md = (out / "t.md").read_text()
    # fixmatch uniform: bal 50, 60 -> 55.00 ± 7.07; tail 20, 40 -> 30.00 ± 14.14
    assert "| uniform | fixmatch | 0,1 | 55.00 ± 7.07 | 65.00 ± 7.07 | 57.00 ± 7.07 | " \
           "30.00 ± 14.14 |" in md
    assert "| uniform | fixmatch+daso | 0 | 70.00 | 80.00 | 71.00 | 20.00 |" in md
    assert "| uniform | fixmatch+daso | 20 | 20 |" in md  # semantic recall row, classes 0, 1
    assert "cifar10_lt_g100_n1500_uniform_fixmatch-seed2" in md  # listed as not run yet
    assert len(json.loads((out / "t_runs.json").read_text())) == 3
    assert (out / "t_runs.csv").read_text().count("\n") == 4


def test_run_state_and_resume_command(runs, tmp_path):
    assert bench.run_state(runs / "a-seed0") == "finished"
    assert bench.run_state(runs / "c-seed0") == "broken"  # no checkpoint to resume from
    (runs / "c-seed0" / "checkpoints").mkdir()
    (runs / "c-seed0" / "checkpoints" / "ckpt_00000500.pt").write_bytes(b"x")
    assert bench.run_state(runs / "c-seed0") == "resumable"
    assert bench.run_state(tmp_path / "nothing") == "missing"
    job = bench.Job("reversed", "fixmatch+daso", 1)
    assert job.row == "mini/cifar10_lt_g100_n1500_reversed_fixmatch_daso"
    cmd = bench.train_command(job, runs / "c-seed0", "resumable", [])
    assert "resume=true" in cmd and f"experiment={job.row}" in cmd and "seed=1" in cmd
    assert "overwrite=true" in bench.train_command(job, runs / "x", "broken", [])


def test_matrix_priority_order():
    jobs = bench.matrix()
    assert len(jobs) == len(set(jobs))
    first = [(j.setting, j.method, j.seed) for j in jobs[:7]]
    assert first[:2] == [("uniform", "fixmatch", 0), ("uniform", "fixmatch+daso", 0)]
    assert all(seed == 0 for *_, seed in first) and ("all", "supervised", 0) in first
    assert jobs[-1] == bench.Job("uniform", "simmatch+daso", 0)


def test_select_jobs_by_name():
    jobs = bench.matrix()
    chosen = bench.select_jobs(jobs, ["uniform_fixmatch_daso-seed0"])
    assert [j.name for j in chosen] == ["cifar10_lt_g100_n1500_uniform_fixmatch_daso-seed0"]
    assert bench.select_jobs(jobs, []) == jobs
    with pytest.raises(SystemExit, match="matches no job"):
        bench.select_jobs(jobs, ["no-such-run"])


def test_daso_gains_are_paired_by_seed(runs, tmp_path):
    make_run(runs, "b-seed1", method="fixmatch+daso", setting="uniform", seed=1, bal=0.55,
             final=0.56, recall=[0.9] * 7 + [0.6, 0.7, 0.8])
    # a +DASO run whose seed has no run without DASO is left out of the pairs
    make_run(runs, "b-seed7", method="fixmatch+daso", setting="uniform", seed=7, bal=0.99,
             final=0.99, recall=[0.9] * 10)
    recs = bench.read_records(runs)
    gains = bench.paired_gains(recs, "bal_acc_median")
    assert gains == {("uniform", "fixmatch", "daso_official"): pytest.approx([0.20, -0.05])}
    # tail recall: seed 0 0.2 - 0.2, seed 1 0.7 - 0.4
    tail = bench.paired_gains(recs, "tail_recall_final")[("uniform", "fixmatch", "daso_official")]
    assert tail == pytest.approx([0.0, 0.3])
    table = "\n".join(bench.gains_table(recs))
    # (20 - 5) / 2 = 7.50, sample std of (20, -5) = 17.68; one of two seeds gains
    assert "| uniform | fixmatch | 2 | 7.50 ± 17.68 | 1 of 2 | 15.00 ± 21.21 | 1 of 2 |" in table
    bench.write_outputs(recs, [], tmp_path / "out", "t")
    assert "paired by seed" in (tmp_path / "out" / "t.md").read_text()
