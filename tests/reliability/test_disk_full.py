"""A full disk (ENOSPC from a patched writer) while a checkpoint or a log is written: the run
stops with one line naming the path (exit code 74), no partial file is left, the previous
checkpoint stays loadable, and ``resume=true`` later continues to the same end as an
uninterrupted run."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from imbssl.diagnostics.logfile import RunLog
from imbssl.engine.checkpoint import list_checkpoints, load_checkpoint
from imbssl.fileio import DiskFullError, atomic_open

OVERRIDES = ["trainer.iterations=6", "trainer.report=false", "trainer.keep_checkpoints=3",
             "pseudo=none", "trainer.deterministic=true"]
FILES = ("metrics.jsonl", "per_class.csv", "summary.json")


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_open_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old\n")
    with pytest.raises(DiskFullError) as err, atomic_open(path, "w") as f:
        f.write("partial")
        no_space()
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file


def test_full_disk_while_checkpointing_then_resume(tiny_cfg, tmp_path, monkeypatch, capsys, rel):
    from imbssl.cli import EXIT_DISK_FULL, main
    from imbssl.engine.trainer import Trainer

    ref = Trainer(tiny_cfg(*OVERRIDES, f"run_dir={tmp_path / 'ref'}"))
    ref.run()

    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"\x00" * 4096)  # some bytes land before the disk fills up
            no_space()
        return real_save(obj, f, *args, **kwargs)

    run = tmp_path / "full"
    args = ["train", *OVERRIDES, *rel.QUIET[:2], "device=cpu", "trainer.batch_size=8",
            "trainer.eval_interval=2", "trainer.log_interval=2", "trainer.checkpoint_interval=2",
            f"run_dir={run}"]
    monkeypatch.setattr(torch, "save", save_until_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == EXIT_DISK_FULL
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = run / "checkpoints" / "ckpt_00000004.pt"
    assert len(err) == 1 and "no space left" in err[0] and str(ckpt) in err[0], err
    monkeypatch.setattr(torch, "save", real_save)

    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000002.pt"]
    assert load_checkpoint(run / "checkpoints" / "ckpt_00000002.pt")["step"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and str(ckpt) in summary["error"]

    resumed = Trainer(tiny_cfg(*OVERRIDES, f"run_dir={run}", "resume=true"))
    assert resumed.run()["status"] == "finished" and resumed._resumed_at == 2
    final = "checkpoints/ckpt_00000006.pt"
    assert rel.differences(torch.load(tmp_path / "ref" / final, weights_only=True),
                           torch.load(run / final, weights_only=True)) == []
    for name in FILES:
        assert (tmp_path / "ref" / name).read_bytes() == (run / name).read_bytes(), name


def test_full_disk_while_logging_then_resume(tiny_cfg, tmp_path, monkeypatch):
    from imbssl.engine.trainer import Trainer

    real_append = RunLog.append_metrics

    def append_until_full(self, row):
        if row["step"] == 4:
            no_space()
        real_append(self, row)

    run = tmp_path / "run"
    monkeypatch.setattr(RunLog, "append_metrics", append_until_full)
    with pytest.raises(DiskFullError) as err:
        Trainer(tiny_cfg(*OVERRIDES)).run()
    assert str(run) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(RunLog, "append_metrics", real_append)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"

    resumed = Trainer(tiny_cfg(*OVERRIDES, "resume=true"))
    assert resumed.run()["status"] == "finished" and resumed._resumed_at == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
