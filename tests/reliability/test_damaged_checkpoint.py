"""A damaged latest checkpoint (truncated, bit-flipped, not a checkpoint) is named, set aside
and ``resume=true`` continues from the newest good one; with none good, ``imbssl train
resume=true`` is one line on stderr, exit code 2, and the run folder is left byte for byte."""
from __future__ import annotations

import pytest
import torch

from imbssl.engine.checkpoint import (
    CHECKSUM_KEY,
    DamagedCheckpoint,
    list_checkpoints,
    load_checkpoint,
    newest_loadable,
    payload_checksum,
    save_checkpoint,
)

ONES = torch.ones(4096)  # float32 1.0 = bytes 00 00 80 3f: easy to find in the file


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path) -> None:
    """Flip one bit inside the stored bytes of ``ONES`` (the zip structure stays intact)."""
    data = bytearray(path.read_bytes())
    at = data.find(bytes.fromhex("0000803f") * 64)
    assert at > 0, "tensor data not found in the file"
    data[at + 130] ^= 0x01
    path.write_bytes(bytes(data))


def wrong_format(path) -> None:
    torch.save([1, 2, 3], path)


DAMAGE = {"truncated": truncate, "bit_flipped": flip_bit, "wrong_format": wrong_format}


def _save(ckpt_dir, step):
    return save_checkpoint({"step": step, "w": ONES * 1, "meta": {"k": [1, 2.5, "x"]}},
                           ckpt_dir, step, keep=5)


def test_checksum_covers_the_payload():
    state = {"step": 3, "w": ONES.clone(), "nested": {"a": [torch.arange(3), 1.5]}}
    base = payload_checksum(state)
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    assert payload_checksum({**state, CHECKSUM_KEY: "anything"}) == base
    changed = {**state, "w": state["w"].clone()}
    changed["w"][7] = 1.0000001
    assert payload_checksum(changed) != base
    assert payload_checksum({**state, "step": 4}) != base
    assert payload_checksum({**state, "w": ONES.double()}) != base  # dtype counts
    assert payload_checksum({**state, "w": ONES.view(64, 64)}) != base  # shape counts


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_file_is_refused_and_the_previous_one_is_used(tmp_path, kind):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    latest = _save(ckpt_dir, 4)
    assert torch.load(latest, weights_only=True)[CHECKSUM_KEY] == payload_checksum(
        torch.load(latest, weights_only=True))
    DAMAGE[kind](latest)
    with pytest.raises(DamagedCheckpoint) as err:
        load_checkpoint(latest)
    assert latest.name in str(err.value) and "\n" not in str(err.value)
    path, state, damaged = newest_loadable(ckpt_dir)
    assert path.name == "ckpt_00000002.pt" and state["step"] == 2
    assert [p.name for p, _ in damaged] == ["ckpt_00000004.pt"]


def test_none_good_is_one_error_naming_them(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step, kind in ((2, "truncated"), (4, "bit_flipped")):
        DAMAGE[kind](_save(ckpt_dir, step))
    with pytest.raises(DamagedCheckpoint) as err:
        newest_loadable(ckpt_dir)
    text = str(err.value)
    assert "ckpt_00000002.pt" in text and "ckpt_00000004.pt" in text and "\n" not in text
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [2, 4]  # nothing deleted


def test_resume_falls_back_and_continues_cli_refuses_when_none_good(tiny_cfg, rel, capsys):
    from imbssl.engine.trainer import Trainer

    overrides = ("trainer.keep_checkpoints=3", "trainer.report=false", "pseudo=none")
    first = Trainer(tiny_cfg(*overrides))
    first.run()
    ckpt_dir = first.run_dir / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [2, 4]
    truncate(ckpt_dir / "ckpt_00000004.pt")

    capsys.readouterr()
    resumed = Trainer(tiny_cfg(*overrides, "resume=true", "trainer.iterations=6"))
    summary = resumed.run()
    err = capsys.readouterr().err
    assert "ckpt_00000004.pt" in err and "resuming from ckpt_00000002.pt" in err
    assert resumed._resumed_at == 2 and summary["status"] == "finished" and summary["step"] == 6
    assert (ckpt_dir / "ckpt_00000004.pt.damaged").is_file()  # set aside, not deleted
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [2, 4, 6]
    assert load_checkpoint(ckpt_dir / "ckpt_00000004.pt")["step"] == 4  # rewritten, good

    for _, path in list_checkpoints(ckpt_dir):
        if path.name.endswith("6.pt"):  # one bit in the middle of the file
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))
        else:
            truncate(path)
    before = rel.folder_digest(first.run_dir)
    proc = rel.cli("train", *overrides[:1], *overrides[2:], *rel.QUIET, "trainer.iterations=8",
                   "trainer.batch_size=8", "trainer.eval_interval=2", "trainer.log_interval=2",
                   "trainer.checkpoint_interval=2", f"run_dir={first.run_dir}", "resume=true",
                   timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "ckpt_00000006.pt" in lines[0]
    assert rel.folder_digest(first.run_dir) == before
