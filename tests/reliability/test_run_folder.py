"""Run-folder rules: resume drops rows logged after the checkpoint, overwrite clears the old
run, resuming a finished run changes nothing, evaluation of a checkpoint still works."""
from __future__ import annotations

import json

from imbssl.engine.run_dir import truncate_logs
from imbssl.engine.trainer import Trainer


def test_truncate_logs_drops_rows_after_the_checkpoint_and_partial_lines(tmp_path):
    rows = [{"step": s, "split": "train", "x": s} for s in (2, 4, 6, 8)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 10, "spl')  # killed mid-line
    header = "step,source,kind,subset,class,class_name,metric,value\n"
    body = "".join(f"{s},test,prediction,all,0,a,recall,0.5\n" for s in (4, 6, 8))
    (tmp_path / "per_class.csv").write_text(header + body + "8,test,predi")
    truncate_logs(tmp_path, 4)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(
        json.dumps(r) + "\n" for r in rows[:2])
    assert (tmp_path / "per_class.csv").read_text() == header + body.splitlines(True)[0]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    truncate_logs(tmp_path, 4)  # nothing left to drop: files untouched
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir()}


def test_resuming_a_finished_run_changes_no_row(tiny_cfg):
    Trainer(tiny_cfg("trainer.report=false")).run()
    trainer = Trainer(tiny_cfg("trainer.report=false"))
    run = trainer.run_dir
    files = {n: (run / n).read_bytes() for n in ("metrics.jsonl", "per_class.csv",
                                                 "summary.json", "confusion_test.npy")}
    resumed = Trainer(tiny_cfg("trainer.report=false", "resume=true"))
    summary = resumed.run()
    assert summary["status"] == "finished" and summary["step"] == 4
    for name, data in files.items():
        assert (run / name).read_bytes() == data, name


def test_overwrite_starts_afresh(tiny_cfg):
    Trainer(tiny_cfg("trainer.iterations=6", "trainer.report=false")).run()
    trainer = Trainer(tiny_cfg("overwrite=true", "trainer.report=false"))
    trainer.run()
    ckpts = sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir())
    assert ckpts == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    steps = [json.loads(line)["step"]
             for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
