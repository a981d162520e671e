"""cRT: starts from a finished run's checkpoint, trains only the classifier, samples the
labeled set class-aware (official ClassAwareSampler, beta 0.999), evaluates the online network;
runs after FixMatch and after FixMatch + DASO on digits-LT."""
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
    state = trainer.labeled_stream.state_dict()
    assert (state["sampling"], state["beta"]) == ("class_aware", 0.999)
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


def test_crt_settings_default_to_the_official_code(tiny_cfg, ssl_runs):
    """Class-aware sampling with beta 0.999 and evaluation of the online network (official
    SemiSupervised.evaluate: eval_model = self.model for cRT); each is a setting."""
    run = ssl_runs["fixmatch"]
    trainer = Trainer(tiny_cfg("algorithm=crt", "pseudo=none", f"algorithm.init_from={run}",
                               *QUIET))
    assert trainer.algo.eval_network(trainer.model, trainer.ema.model) is trainer.model
    trainer.train_step()
    trainer.train_step()
    online = trainer._measure("test", trainer.data.test)["confusion"]
    from imbssl.engine.evaluate import confusion_matrix

    ema = confusion_matrix(trainer.ema.model, trainer.data.test.images, trainer.data.test.labels,
                           trainer.data.augmenter.normalize, trainer.data.num_classes, 256,
                           trainer.autocast)
    direct = confusion_matrix(trainer.model, trainer.data.test.images, trainer.data.test.labels,
                              trainer.data.augmenter.normalize, trainer.data.num_classes, 256,
                              trainer.autocast)
    assert (online == direct.cpu().numpy()).all()
    assert not (online == ema.cpu().numpy()).all()  # the EMA still holds the old classifier
    other = Trainer(tiny_cfg("algorithm=crt", "pseudo=none", f"algorithm.init_from={run}",
                             "algorithm.eval_network=ema", "algorithm.sampler=random", *QUIET))
    assert other.algo.eval_network(other.model, other.ema.model) is other.ema.model
    assert "permutation" in other.labeled_stream.state_dict()  # epochs of shuffled images


@pytest.mark.parametrize("bad", ["algorithm.sampler=balanced", "algorithm.sampler_beta=0",
                                 "algorithm.sampler_beta=1.5", "algorithm.eval_network=best"])
def test_bad_crt_settings_are_one_line_errors(tiny_cfg, ssl_runs, bad):
    with pytest.raises(UserError, match=bad.split("=")[0]) as err:
        Trainer(tiny_cfg("algorithm=crt", "pseudo=none",
                         f"algorithm.init_from={ssl_runs['fixmatch']}", bad, *QUIET))
    assert "\n" not in str(err.value)


def test_class_aware_stream_resumes_exactly():
    from imbssl.algorithms.crt import ClassAwareSampling

    labels = torch.tensor([0] * 9 + [1] * 3)
    data = TensorSet(torch.zeros(12, 1, 1, 1, dtype=torch.uint8), labels)
    a = make_stream(data, 5, seed=3, sampling=ClassAwareSampling(0.999))
    a.next()
    state = a.state_dict()
    expected = [a.next()[2] for _ in range(3)]
    b = make_stream(data, 5, seed=99, sampling=ClassAwareSampling(0.999))
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next()[2]) for e in expected)
    with pytest.raises(ValueError, match="beta"):
        make_stream(data, 5, seed=0, sampling=ClassAwareSampling(0.9)).load_state_dict(state)


def test_multistep_schedule_is_the_official_supervised_one():
    """optim=sgd_multistep: official configs/cifar10/supervised.yaml (lr 0.1, x0.01 at 199999
    and at 225000, 6250 warm-up steps)."""
    from imbssl.cli import compose
    from imbssl.engine.config import OptimConfig, typed
    from imbssl.engine.trainer import lr_factor

    o = typed(compose(["optim=sgd_multistep"]), "optim", OptimConfig)
    assert (o.lr, o.schedule, list(o.milestones), o.gamma, o.warmup_iters) == (
        0.1, "multistep", [199999, 225000], 0.01, 6250)
    f = [lr_factor(s, 250000, o.schedule, o.warmup_iters, o.milestones, o.gamma)
         for s in (6250, 199998, 199999, 224999, 225000, 249999)]
    assert f == pytest.approx([1.0, 1.0, 0.01, 0.01, 1e-4, 1e-4])
