"""analysis/gpu_validate.sh: the whole script in --dry-run on the CPU (so it cannot rot), and
its pieces: the augmentation replay, the run-folder and loss checks, the curve, the prep."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from imbssl.bench import validate as V
from imbssl.data import NORMALIZATION, Augmenter
from imbssl.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One --dry-run of the shell script: (exit code, results JSON, out folder, work folder)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    base = tmp_path_factory.mktemp("validate")
    out, work = base / "out", base / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "analysis" / "gpu_validate.sh"), "--dry-run",
                           "--out", str(out), "--work", str(work)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    results = json.loads((out / "gpu_validate.json").read_text())
    return proc, results, out, work


@pytest.mark.slow
def test_dry_run_passes_and_lists_what_it_skipped(dry_run):
    proc, results, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["mode"] == "dry-run" and results["failed"] == []
    assert (out / "gpu_validate.md").is_file() and (out / "gpu_validate.log").is_file()
    items = results["items"]
    assert set(items) == {"aug", "bench", "smoke", "sync", "train", "nccl_syncbn"}
    assert items["bench"]["status"] == items["smoke"]["status"] == "passed"
    assert items["train"]["status"] == "passed"
    assert items["sync"]["status"] == items["nccl_syncbn"]["status"] == "skipped"
    if not torch.cuda.is_available():
        assert items["aug"]["status"] == "skipped"
    assert items["aug"]["cpu_replay_equals_strong_u8"] is True
    skipped = "\n".join(results["skipped"])
    for needle in ("sync:", "nccl_syncbn:", "smoke compile on:", "aug:"):
        assert needle in skipped, needle
    md = (out / "gpu_validate.md").read_text()
    for needle in ("| aug |", "| smoke |", "## bench, fp32", "## bench, bf16", "## skipped",
                   "## training run"):
        assert needle in md, needle


@pytest.mark.slow
def test_dry_run_bench_reports_both_precisions_by_row(dry_run):
    _, results, _, _ = dry_run
    reports = results["items"]["bench"]["reports"]
    assert set(reports) == {"fp32", "bf16"}
    for precision, report in reports.items():
        rows = [r["experiment"] for r in report["results"]]
        assert rows == list(V.BENCH_ROWS)
        for r in report["results"]:
            assert r["precision"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
            assert r["batch_size"] == 8 and r["images_per_step"]["total"] == 8 + 2 * 8 * 2
            assert r["ours"]["its_per_s"] > 0
            assert ("conventional" in r) == (precision == "bf16")


@pytest.mark.slow
def test_dry_run_smoke_covers_every_algorithm_with_complete_folders(dry_run):
    _, results, _, work = dry_run
    cases = results["items"]["smoke"]["cases"]
    assert [c["case"] for c in cases] == [*V.SMOKE_ROWS, "supervised"]
    for c in cases:
        assert c["status"] == "passed" and c["compile"] is False, c
        assert c["train_rows"] == 2 and c["problems"] == []  # log_interval 1, 2 steps
        assert c["sync"]["status"] == "skipped"
        assert V.run_folder_problems(work / c["run_dir"], 2, report=c is cases[0]) == []
    assert (work / cases[0]["run_dir"] / "report.html").is_file()
    daso = OmegaConf.load(work / cases[1]["run_dir"] / "config.yaml")  # fixmatch_daso
    assert daso.pseudo.name == "daso" and daso.pseudo.warmup_iters == 1  # DASO on at step 1
    assert daso.pseudo.dist_window == 1 and daso.model.name == "small_cnn"


@pytest.mark.slow
def test_dry_run_training_curve(dry_run):
    _, results, _, _ = dry_run
    train = results["items"]["train"]
    assert train["summary_status"] == "finished" and train["steps"] == 4
    assert not train["stopped_at_deadline"]
    steps = [e["step"] for e in train["curve"]["evaluations"]]
    assert steps == [2, 4]
    for e in train["curve"]["evaluations"]:
        assert 0.0 <= e["test_top1"] <= 1.0 and 0.0 <= e["test_balanced_acc"] <= 1.0
    assert [t["step"] for t in train["curve"]["train"]] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("channels,size,flip", [(3, 32, True), (1, 8, False)])
def test_replay_is_the_augmentation(channels, size, flip):
    x = torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    aug = Augmenter((0.5,) * channels, (0.25,) * channels, flip=flip)
    p = V.draw_strong_params(aug, 64, size, size, torch.Generator().manual_seed(7))
    out = V.replay_strong(aug, x, p)
    assert torch.equal(out, aug.strong_u8(x, torch.Generator().manual_seed(7)))
    assert torch.equal(V.replay_weak(aug, x, p), aug.weak_u8(x, torch.Generator().manual_seed(7)))
    p["ox"] = (p["ox"] + 1) % (2 * aug.pad(size) + 1)  # another crop: another image
    assert not torch.equal(V.replay_strong(aug, x, p), out)


def test_params_move_to_another_device():
    aug = Augmenter(*NORMALIZATION["cifar10"])
    p = V.draw_strong_params(aug, 4, 32, 32, torch.Generator().manual_seed(0))
    moved = V.params_to(p, "cpu")
    assert set(moved) == set(p) and len(moved["slots"]) == aug.randaug_n
    assert all(torch.equal(moved[k], p[k]) for k in ("flip", "oy", "ox", "top", "left"))


# ----------------------------------------------------------------------------- run folders

def test_run_folder_and_loss_checks(tiny_cfg):
    from imbssl.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg("trainer.tensorboard=true", "trainer.report=false"))
    trainer.run()
    run = trainer.run_dir
    assert V.run_folder_problems(run, 4, report=False) == []
    assert V.loss_problems(run) == (2, [])
    assert V.run_folder_problems(run, 4, report=True) == ["report.html / report.md missing"]
    assert V.run_folder_problems(run, 6, report=False) == [
        "checkpoints/ckpt_00000006.pt missing",
        "summary.json: status 'finished' at step 4, expected 'finished' at 6",
        "metrics.jsonl has no test evaluation at step 6"]
    (run / "checkpoints" / "ckpt_00000004.pt").unlink()
    (run / "per_class.csv").write_text("")
    problems = V.run_folder_problems(run, 4, report=False)
    assert problems == ["per_class.csv missing or empty", "checkpoints/ckpt_00000004.pt missing"]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "split": "train", "loss/total": math.nan}) + "\n")
    assert V.loss_problems(run) == (3, ["loss/total=nan at step 5"])
    assert trainer_paths_ok(trainer)


def trainer_paths_ok(trainer) -> bool:
    paths = V.trainer_paths(trainer)
    # channels_last: the model config asks for it, and the CPU uses it too (oneDNN)
    assert paths == {"device": "cpu", "precision": "float32", "channels_last": True,
                     "fused_sgd": False, "compiled": False, "data_device": "cpu"}
    assert V.path_problems(paths, False, dry=True) == []
    assert V.path_problems(paths, True, dry=True) == ["compiled=False, expected True"]
    gpu = V.path_problems(paths, False, dry=False)
    assert "precision='float32', expected 'bfloat16'" in gpu and len(gpu) == 4
    return True


def test_curve_reads_complete_rows_only(tmp_path):
    rows = [{"step": 500, "split": "train", "loss/total": 1.5, "mask_rate": 0.3, "lr": 0.03},
            {"step": 500, "split": "test", "top1": 0.5, "balanced_acc": 0.4},
            {"step": 500, "split": "valid", "top1": 0.6, "balanced_acc": 0.6},
            {"step": 1000, "split": "test", "top1": 0.7, "balanced_acc": 0.65}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1500, "spl'
    (tmp_path / "metrics.jsonl").write_text(text)
    curve = V.accuracy_curve(tmp_path)
    assert curve["evaluations"] == [
        {"step": 500, "test_top1": 0.5, "test_balanced_acc": 0.4, "valid_top1": 0.6,
         "valid_balanced_acc": 0.6},
        {"step": 1000, "test_top1": 0.7, "test_balanced_acc": 0.65}]
    assert curve["train"] == [{"step": 500, "loss/total": 1.5, "mask_rate": 0.3}]


# ----------------------------------------------------------------------------- sync, summary

def test_sync_check_is_skipped_on_cpu(tiny_cfg):
    from imbssl.engine.trainer import Trainer

    assert V.check_sync(Trainer(tiny_cfg()), 1)["status"] == "skipped"


def test_sync_site_names_our_line_and_the_deeper_one():
    stack = [traceback.FrameSummary("/x/imbssl/engine/trainer.py", 10, "train_step"),
             traceback.FrameSummary("/x/imbssl/algorithms/fixmatch.py", 42, "step"),
             traceback.FrameSummary("/usr/lib/torch/_tensor.py", 7, "item"),
             traceback.FrameSummary("/usr/lib/python3/warnings.py", 1, "_showwarnmsg")]
    assert V.sync_site(stack, "?") == ("imbssl/algorithms/fixmatch.py:42 in step "
                                       "(via _tensor.py:7 in item)")
    assert V.sync_site(stack[:2], "?") == "imbssl/algorithms/fixmatch.py:42 in step"


def test_summarize_sync():
    ok = {"status": "passed", "sync_sites": {}}
    bad = {"status": "failed", "error": "x", "sync_sites": {"imbssl/a.py:1 in f": 2}}
    smoke = {"cases": [{"case": "a", "compile": False, "sync": ok},
                       {"case": "b", "compile": True, "sync": bad}]}
    out = V.summarize_sync(smoke)
    assert out["status"] == "failed" and out["failed_cases"] == ["b compile=True"]
    assert out["sync_sites"] == {"imbssl/a.py:1 in f": 2} and out["checked"] == 2
    assert V.summarize_sync({"cases": smoke["cases"][:1]})["status"] == "passed"
    assert V.summarize_sync({})["status"] == "skipped"


# ----------------------------------------------------------------------------- prep, CLI

def _fake_shared(root: Path) -> Path:
    (root / "device-wheels").mkdir(parents=True)
    (root / "data").mkdir()
    for name in ("hydra_core-1.3.8", "omegaconf-2.3.0", "antlr4_python3_runtime-4.9.3"):
        (root / "device-wheels" / f"{name}-py3-none-any.whl").write_bytes(b"w" * 1000)
    for split in ("train", "test"):
        (root / "data" / f"cifar10_{split}_jpeg.npz").write_bytes(b"d" * 2**20)
    (root / "data" / "materialize.py").write_text("print('ok')\n")
    return root


def test_prep_copies_wheels_and_data_and_checks_the_size(tmp_path):
    shared, repo = _fake_shared(tmp_path / "shared"), tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/.device/\n")
    info = V.prep(shared, repo)
    files = sorted(p.relative_to(repo / ".device").as_posix()
                   for p in (repo / ".device").rglob("*") if p.is_file())
    assert files == ["data/cifar10_test_jpeg.npz", "data/cifar10_train_jpeg.npz",
                     "data/materialize.py", "source.json",
                     "wheels/antlr4_python3_runtime-4.9.3-py3-none-any.whl",
                     "wheels/hydra_core-1.3.8-py3-none-any.whl",
                     "wheels/omegaconf-2.3.0-py3-none-any.whl"]
    assert info["carried_mib"] == pytest.approx(2 + 3012 / 2**20, abs=1e-3)
    source = json.loads((repo / ".device" / "source.json").read_text())
    assert source == {"git_commit": "unknown", "git_dirty": False}  # a repo with no commit
    assert V.commit_line({"git_commit": "unknown", "commit_at_prep": {
        "git_commit": "0123456789abcdef", "git_dirty": True}}) == (
        "0123456789ab + uncommitted changes (at --prep)")
    assert V.commit_line({"git_commit": "fedcba9876543210", "git_dirty": False}) == "fedcba987654"
    assert info["total_mib"] >= info["carried_mib"]
    with pytest.raises(UserError, match="over the device tool's 1.5 MiB"):
        V.prep(shared, repo, limit_mib=1.5)
    (shared / "data" / "materialize.py").unlink()
    with pytest.raises(UserError, match="lacks"):
        V.prep(shared, repo)


def test_bad_compile_option_is_one_line_exit_2(tmp_path, capsys):
    assert V.main(["run", "--dry-run", "--compile", "maybe", "--out", str(tmp_path)]) == 2
    assert "--compile" in capsys.readouterr().err


def test_bench_does_not_import_the_cli():
    code = ("import sys, imbssl.bench.throughput, imbssl.bench.validate, "
            "imbssl.bench.conventional, imbssl.bench.measure; "
            "sys.exit('imbssl.cli' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_gpu_mode_configs_compose(tmp_path):
    """What the GPU run will train, composed here (the dry run swaps dataset and model)."""
    from imbssl.engine.config import compose

    ctx = V._context(V.parser().parse_args(["run", "--out", str(tmp_path), "--data-root",
                                            "/data", "--set", "seed=3"]))
    assert (ctx.dry, ctx.steps, ctx.compile_modes, ctx.budget_s) == (False, 30, [False, True],
                                                                     420.0)
    cases = V.smoke_cases(ctx)
    assert len(cases) == 2 * (len(V.SMOKE_ROWS) + 1)
    for name, base, compile_ in cases:
        ov = V.smoke_overrides(ctx, base, compile_, tmp_path / "run", report=False)
        cfg = compose(V.with_daso_schedule(ov, compose(ov), ctx.steps))
        assert (cfg.model.name, cfg.dataset.name, cfg.dataset.root) == ("wrn28_2", "cifar10",
                                                                         "/data")
        assert cfg.trainer.precision == "bf16" and cfg.trainer.compile is compile_
        assert cfg.trainer.batch_size == 64 and cfg.seed == 3 and cfg.device == "cuda"
        assert cfg.trainer.iterations == 30 and cfg.trainer.checkpoint_interval == 30
        if name.endswith("_daso"):
            assert (cfg.pseudo.warmup_iters, cfg.pseudo.dist_window) == (10, 5)
        else:
            assert cfg.pseudo.name == "none"


def test_dynamo_counts_count_compiled_graphs():
    torch._dynamo.reset()
    before = V.dynamo_counts()
    torch.compile(lambda t: t * 2 + 1, backend="eager")(torch.ones(3))
    assert (V.dynamo_counts() - before)["graphs"] == 1
