"""``resume=true`` with a changed config (issue 32, item 2): a key that changes what the run
computes (learning rate, seeds, batch size, EMA decay, threshold, refiner...) is refused with
one line naming the differing keys, and nothing in the run folder changes; the keys resume
may change (``RESUMABLE_KEYS``: trainer.iterations, log/checkpoint intervals, output
switches) are accepted and recorded in meta.json, and config.yaml then holds the new
values."""
from __future__ import annotations

import json

import pytest
import yaml

from imbssl.cli import main
from imbssl.engine.config import config_changes, flatten, resumable

TINY = ["trainer.iterations=4", "trainer.batch_size=8", "trainer.eval_interval=2",
        "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.report=false", "device=cpu", "pseudo=none"]

REFUSED = [
    ("optim.lr=0.3", ["optim.lr: 0.03 -> 0.3"]),
    ("seed=1", ["seed: 0 -> 1"]),
    ("dataset.seed=5", ["dataset.seed:"]),
    ("trainer.batch_size=16", ["trainer.batch_size: 8 -> 16"]),
    ("model.ema_decay=0.9", ["model.ema_decay:"]),
    ("algorithm.threshold=0.5", ["algorithm.threshold: 0.95 -> 0.5"]),
    ("pseudo=daso", ["pseudo.name: 'none' -> 'daso'"]),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    run = tmp_path_factory.mktemp("resume_config") / "run"
    Trainer(compose([*TINY, f"run_dir={run}"])).run()
    GlobalHydra.instance().clear()
    return run


@pytest.mark.parametrize(("override", "words"), REFUSED, ids=[o for o, _ in REFUSED])
def test_changed_config_is_refused(finished, rel, capsys, override, words):
    from hydra.core.global_hydra import GlobalHydra

    before = rel.folder_digest(finished)
    GlobalHydra.instance().clear()
    code = main(["train", *TINY, f"run_dir={finished}", "resume=true", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "config differs from the run's" in err[0]
    for word in words:
        assert word in err[0], err[0]
    assert rel.folder_digest(finished) == before


def test_extending_iterations_is_accepted_and_recorded(tmp_path, capsys):
    from hydra.core.global_hydra import GlobalHydra

    run = tmp_path / "run"
    GlobalHydra.instance().clear()
    assert main(["train", *TINY, f"run_dir={run}"]) == 0
    GlobalHydra.instance().clear()
    assert main(["train", *TINY, f"run_dir={run}", "resume=true", "trainer.iterations=6",
                 "trainer.log_interval=1"]) == 0, capsys.readouterr().err
    meta = json.loads((run / "meta.json").read_text())
    assert meta["resumes"][-1]["step"] == 4
    assert meta["resumes"][-1]["changed"] == {"trainer.iterations": [4, 6],
                                              "trainer.log_interval": [2, 1]}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["iterations"] == 6
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    # the same command again: nothing changed this time, and it is accepted
    GlobalHydra.instance().clear()
    assert main(["train", *TINY, f"run_dir={run}", "resume=true", "trainer.iterations=6",
                 "trainer.log_interval=1"]) == 0
    assert json.loads((run / "meta.json").read_text())["resumes"][-1]["changed"] == {}


def test_changes_and_the_keys_resume_accepts():
    saved = {"seed": 0, "trainer": {"iterations": 4, "batch_size": 8}, "gone": 1, "notes": {}}
    current = {"seed": 1, "trainer": {"iterations": 6, "batch_size": 8}, "new": 2,
               "notes": {"why": "x"}}
    assert flatten(saved) == {"seed": 0, "trainer.iterations": 4, "trainer.batch_size": 8,
                              "gone": 1, "notes": {}}
    # keys only one side has (another imbssl version's fields) are not the user's change
    assert config_changes(saved, current) == {"seed": (0, 1), "trainer.iterations": (4, 6)}
    assert resumable("trainer.iterations") and resumable("logger.name")
    assert not resumable("trainer.iterations_x") and not resumable("optim.lr")
