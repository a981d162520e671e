"""Checkpoint fields are checked before anything on disk changes (issue 32, item 4), and
what only looks like the newest checkpoint is skipped (item 10). A checkpoint with a valid
checksum but ``step=-50`` (or a step that is not its name's, or a missing or mistyped field)
is damaged: resume falls back to the previous checkpoint (the bad one is set aside as
``*.damaged``) and ``metrics.jsonl`` keeps every row up to that checkpoint; a folder or a
dangling link named like the newest checkpoint is skipped the same way instead of stopping
the resume."""
from __future__ import annotations

import json

import pytest
import torch

from imbssl.engine.checkpoint import (
    CHECKSUM_KEY,
    DamagedCheckpoint,
    field_problem,
    load_checkpoint,
    payload_checksum,
)
from imbssl.engine.trainer import Trainer

LONGER = ["trainer.iterations=6", "trainer.keep_checkpoints=5", "trainer.report=false",
          "pseudo=none"]


def resign(state: dict, path) -> None:
    """Save ``state`` with a checksum that matches it (a crafted, self-consistent file)."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    torch.save({**state, CHECKSUM_KEY: payload_checksum(state)}, path)


def steps(run) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def stopped_at_4(tiny_cfg):
    """A run stopped after its checkpoint of step 4 (of 6): checkpoints 2 and 4."""
    trainer = Trainer(tiny_cfg(*LONGER, "trainer.iterations=4"))
    trainer.run()
    return trainer.run_dir


CRAFTED = {
    "negative_step": lambda s: {**s, "step": -50},
    "step_not_its_name": lambda s: {**s, "step": 2},
    "float_step": lambda s: {**s, "step": 4.0},
    "missing_eval_history": lambda s: {k: v for k, v in s.items() if k != "eval_history"},
    "model_not_a_dict": lambda s: {**s, "model": [1, 2]},
    "history_of_strings": lambda s: {**s, "eval_history": {"test/top1": ["x"]}},
}


@pytest.mark.parametrize("craft", list(CRAFTED), ids=list(CRAFTED))
def test_crafted_newest_checkpoint_falls_back_and_keeps_the_logs(stopped_at_4, tiny_cfg,
                                                                 craft):
    run = stopped_at_4
    newest = run / "checkpoints" / "ckpt_00000004.pt"
    resign(CRAFTED[craft](torch.load(newest, weights_only=True)), newest)
    with pytest.raises(DamagedCheckpoint, match="not a usable imbssl checkpoint"):
        load_checkpoint(newest)
    before = steps(run)
    assert max(before) == 4
    resumed = Trainer(tiny_cfg(*LONGER, "resume=true"))
    resumed.prepare()
    assert resumed._resumed_at == 2
    assert steps(run) == before  # nothing changed before the run starts
    resumed.run()
    assert (run / "checkpoints" / "ckpt_00000004.pt.damaged").exists()
    after = steps(run)
    assert [s for s in after if s <= 2] == [s for s in before if s <= 2]  # rows kept
    assert after == sorted(after) and after[-1] == 6


@pytest.mark.parametrize("kind", ["folder", "dangling_link"])
def test_a_non_file_named_like_the_newest_checkpoint_is_skipped(stopped_at_4, tiny_cfg, kind):
    run = stopped_at_4
    fake = run / "checkpoints" / "ckpt_00000009.pt"
    if kind == "folder":
        fake.mkdir()
    else:
        fake.symlink_to(run / "nowhere.pt")
    resumed = Trainer(tiny_cfg(*LONGER, "trainer.iterations=10", "resume=true"))
    summary = resumed.run()
    assert resumed._resumed_at == 4 and summary["status"] == "finished"
    assert (run / "checkpoints" / "ckpt_00000009.pt.damaged").is_symlink() == (
        kind == "dangling_link")


def test_field_problem_accepts_real_and_minimal_states(stopped_at_4, tmp_path):
    path = stopped_at_4 / "checkpoints" / "ckpt_00000004.pt"
    assert field_problem(torch.load(path, weights_only=True), path) is None
    assert field_problem({"step": 3, "w": torch.ones(2)}, tmp_path / "any.pt") is None
    assert "step True" in field_problem({"step": True}, tmp_path / "any.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if unpickled


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "ckpt_00000002.pt"
    torch.save({"step": 2, "payload": _RunsCode(marker)}, path)
    with pytest.raises(DamagedCheckpoint):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_yaml_tagged_config_is_refused_on_resume(stopped_at_4, tiny_cfg):
    from imbssl.errors import UserError

    run = stopped_at_4
    marker = run / "ran"
    (run / "config.yaml").write_text(
        f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="config.yaml cannot be read"):
        Trainer(tiny_cfg(*LONGER, "resume=true")).prepare()
    assert not marker.exists()
