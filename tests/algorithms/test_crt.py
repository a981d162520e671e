"""cRT: starts from a finished run's checkpoint, trains only the classifier, samples the
labeled set class-balanced; runs after FixMatch and after FixMatch + DASO on digits-LT."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from imbssl.algorithms.crt import is_classifier
from imbssl.data.device_loader import ClassBalancedStream, TensorSet, make_stream
from imbssl.engine.trainer import Trainer
from imbssl.errors import UserError

QUIET = ["trainer.report=false", "trainer.tensorboard=false"]


def test_class_balanced_stream_is_balanced_in_expectation():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 8 + [3] * 2)
    data = TensorSet(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), labels)
    stream = ClassBalancedStream(data, 50, seed=0)
    drawn = torch.cat([stream.next()[2] for _ in range(400)])  # 20000 draws
    per_class = torch.bincount(labels[drawn], minlength=4).float() / len(drawn)
    assert torch.allclose(per_class, torch.full((4,), 0.25), atol=0.015)
    # within a class, every image equally likely: class 3's two images ~ 1/8 each
    per_image = torch.bincount(drawn, minlength=100).float() / len(drawn)
    assert torch.allclose(per_image[98:], torch.full((2,), 0.125), atol=0.01)
    x, y, idx = stream.next()
    assert torch.equal(y, labels[idx]) and torch.equal(x.flatten(), idx.to(torch.uint8))


def test_class_balanced_stream_resumes_exactly():
    labels = torch.tensor([0] * 9 + [1] * 3)
    data = TensorSet(torch.zeros(12, 1, 1, 1, dtype=torch.uint8), labels)
    a = make_stream(data, 5, seed=3, sampling="class_balanced")
    a.next()
    state = a.state_dict()
    expected = [a.next()[2] for _ in range(3)]
    b = make_stream(data, 5, seed=99, sampling="class_balanced")
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next()[2]) for e in expected)
    with pytest.raises(ValueError, match="labeled sampling"):
        make_stream(data, 5, seed=0, sampling="balanced")


@pytest.fixture(scope="module")
def ssl_runs(tmp_path_factory):
    """Finished tiny digits-LT runs of the supervised baseline (the DASO paper's Supervised
    w/ cRT), FixMatch and FixMatch + DASO."""
    from imbssl.cli import compose

    root = tmp_path_factory.mktemp("crt")
    tiny = ["trainer.iterations=4", "trainer.batch_size=8", "trainer.eval_interval=2",
            "trainer.checkpoint_interval=2", "trainer.progress=false", "device=cpu", *QUIET]
    runs = {}
    for name, extra in {"supervised": ["algorithm=supervised", "pseudo=none"],
                        "fixmatch": ["algorithm=fixmatch", "pseudo=none"],
                        "fixmatch_daso": ["algorithm=fixmatch", "pseudo=daso",
                                          "pseudo.warmup_iters=1"]}.items():
        cfg = compose([*tiny, *extra, f"run_dir={root / name}"])
        Trainer(cfg).run()
        runs[name] = root / name
    return runs


def test_only_the_classifier_trains_from_the_checkpoint(tiny_cfg, ssl_runs):
    run = ssl_runs["fixmatch"]
    saved = torch.load(run / "checkpoints" / "ckpt_00000004.pt", weights_only=True)
    trainer = Trainer(tiny_cfg("algorithm=crt", "pseudo=none", f"algorithm.init_from={run}",
                               *QUIET))
    assert trainer.labeled_stream.state_dict()["sampling"] == "class_balanced"
    model = trainer.model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in start.items():  # encoder from the checkpoint, classifier fresh
        same = torch.equal(value, saved["model"][name])
        assert same != is_classifier(name), name
    ema = trainer.ema.model.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in saved["ema"].items())
    for _ in range(3):
        trainer.train_step()
    assert math.isfinite(trainer.flush_scalars()["loss/total"])
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]) != is_classifier(name), name
        assert p.requires_grad == is_classifier(name), name
    assert any(is_classifier(n) for n in start)


def test_init_from_that_does_not_exist_is_one_line(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        Trainer(tiny_cfg("algorithm=crt", "pseudo=none",
                         f"algorithm.init_from={tmp_path / 'nowhere'}"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="add pseudo=none"):  # labeled data only: no refiner
        Trainer(tiny_cfg("algorithm=crt", "pseudo=daso"))


def cli_train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "imbssl", "train", *overrides],
                          capture_output=True, text=True, timeout=600, check=False, env=env)


@pytest.mark.parametrize("ssl", ["supervised", "fixmatch", "fixmatch_daso"])
def test_crt_after_ssl_runs_on_digits_lt_via_the_cli(ssl_runs, tmp_path, ssl):
    """The paper's Supervised w/ cRT (DASO Table 11), and cRT after FixMatch (+ DASO)."""
    out = tmp_path / "crt"
    proc = cli_train("dataset=digits_lt", "algorithm=crt", "pseudo=none",
                     f"algorithm.init_from={ssl_runs[ssl]}", "trainer.iterations=4",
                     "trainer.batch_size=8", "trainer.eval_interval=2", "trainer.progress=false",
                     "device=cpu", f"run_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in rows if r["split"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4
    for name in ("config.yaml", "meta.json", "per_class.csv", "report.html",
                 "checkpoints/ckpt_00000004.pt"):
        assert (out / name).is_file(), name
