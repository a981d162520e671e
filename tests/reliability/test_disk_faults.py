"""Full and read-only disks (issue 32, item 8), in real processes: each case runs twice, on
a small tmpfs (mounted where allowed: root) filled up at the moment that matters, and with
the fault injected into the process (ENOSPC / EROFS from every file opened for writing
under the folder), which runs everywhere. Every case ends in
one line on stderr with exit code 74 and no traceback; summary.json never still says
``running``; the previous checkpoint stays loadable and, with space freed, ``resume=true``
ends the run.

Cases: a disk full at the start; full while the run writes its step-4 log rows and
checkpoint; full before the end-of-run report; ``imbssl report`` on a full and on a
read-only folder; an image-folder dataset on a read-only mount.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imbssl.engine.checkpoint import list_checkpoints, load_checkpoint

TINY = ["trainer.iterations=6", "trainer.batch_size=8", "trainer.eval_interval=2",
        "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.keep_checkpoints=5",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
        "device=cpu", "pseudo=none"]


# Where no tmpfs can be mounted (not root), the processes under test get this shim: while
# ROOT/.full exists, opening a file under ROOT for writing fails with ENOSPC (rewriting an
# existing file in place, mode r+, still works, as on a real full disk); while
# ROOT/.readonly exists, with EROFS.
SHIM = """
import builtins, errno, io, os
_ROOT = os.environ.get("IMBSSL_TEST_DISK")
if _ROOT:
    _real_open = builtins.open

    def _open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.abspath(os.fsdecode(file))
            if path.startswith(_ROOT + os.sep):
                code = None
                if os.path.exists(os.path.join(_ROOT, ".readonly")):
                    code = errno.EROFS
                elif os.path.exists(os.path.join(_ROOT, ".full")) and not (
                        "r+" in mode and os.path.exists(path)):
                    code = errno.ENOSPC
                if code is not None:
                    raise OSError(code, os.strerror(code), os.fsdecode(file))
        return _real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _open
"""


class Disk:
    """A mounted tmpfs of ``size`` (or, where mounting is not allowed, a folder whose faults
    the SHIM injects into the processes started with ``env``); ``fill()`` leaves no space,
    ``free()`` gives it back, ``read_only()`` makes it read-only."""

    def __init__(self, where: Path, size: str, rel):
        self.root = where
        where.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, check=False)
        self.mounted = out.returncode == 0
        self.env = rel.ENV
        if not self.mounted:
            shim = where.parent / f"{where.name}_shim"
            shim.mkdir()
            (shim / "sitecustomize.py").write_text(SHIM)
            path = os.pathsep.join(p for p in (str(shim), rel.ENV.get("PYTHONPATH", "")) if p)
            self.env = {**rel.ENV, "PYTHONPATH": path, "IMBSSL_TEST_DISK": str(where.resolve())}
        self.filler = where / "filler"

    def fill(self) -> None:
        if not self.mounted:
            (self.root / ".full").touch()
            return
        chunk = b"\0" * 4096
        with open(self.filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        # a short last write may have fit: make sure not even one byte does
        for name in ("a", "b", "c"):
            try:
                with open(self.root / f".pad_{name}", "wb", buffering=0) as f:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    def free(self) -> None:
        (self.root / ".full").unlink(missing_ok=True)
        for p in self.root.glob(".pad_*"):
            p.unlink()
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        if not self.mounted:
            (self.root / ".readonly").touch()
            return
        subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture(params=["tmpfs", "injected"])
def disk(tmp_path, rel, request, monkeypatch):
    """Disks of both kinds: a real tmpfs (skipped where it cannot be mounted) and injected
    faults (everywhere)."""
    made = []
    if request.param == "injected":  # pretend mounting fails
        real_run = subprocess.run

        def no_mount(cmd, *args, **kwargs):
            if cmd and cmd[0] == "mount":
                return subprocess.CompletedProcess(cmd, 32)
            return real_run(cmd, *args, **kwargs)

        monkeypatch.setattr(subprocess, "run", no_mount)

    def make(size: str = "8m") -> Disk:
        made.append(Disk(tmp_path / f"disk{len(made)}", size, rel))
        if request.param == "tmpfs" and not made[-1].mounted:
            pytest.skip("cannot mount a tmpfs here (not root); the injected case runs")
        return made[-1]

    yield make
    for d in made:
        d.unmount()


def one_line_74(code: int, text: str) -> str:
    lines = text.strip().splitlines()
    assert code == 74, text
    assert "Traceback" not in text and len(lines) == 1, text
    assert lines[0].startswith("imbssl: error: "), text
    return lines[0]


def status(run: Path) -> str | None:
    path = run / "summary.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def test_full_at_the_start(disk, rel):
    d = disk()
    d.fill()
    out = rel.cli("train", *TINY, f"run_dir={d.root / 'run'}", env=d.env)
    line = one_line_74(out.returncode, out.stderr)
    assert "no space left" in line
    assert status(d.root / "run") != "running"


def test_full_while_logging_and_checkpointing_then_resume(disk, rel, capsys):
    d = disk()
    run = d.root / "run"
    args = ["train", *TINY, f"run_dir={run}"]
    live = rel.start_pausing(d.root.parent, args, "step:4", env=d.env)
    rel.wait_paused(live)  # step 4 trained, its logs and checkpoint not yet written
    d.fill()
    code = rel.go_on(live)
    line = one_line_74(code, live.logfile.read_text())
    assert "no space left" in line and str(run) in line
    assert status(run) == "failed"  # written in place: the disk is still full
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert load_checkpoint(run / "checkpoints" / "ckpt_00000002.pt")["step"] == 2
    d.free()
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import main

    GlobalHydra.instance().clear()
    assert main([*args, "resume=true"]) == 0, capsys.readouterr().err
    assert status(run) == "finished"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]


def test_full_before_the_report(disk, rel):
    d = disk()
    run = d.root / "run"
    live = rel.start_pausing(d.root.parent, ["train", *TINY, "trainer.report=true",
                                             f"run_dir={run}"], "report", env=d.env)
    rel.wait_paused(live)
    d.fill()
    code = rel.go_on(live)
    text = live.logfile.read_text()
    err = [ln for ln in text.splitlines() if ln.startswith(("imbssl:", "Traceback"))]
    assert code == 74 and "Traceback" not in text, text
    assert len([e for e in err if "error" in e]) == 1, text
    assert status(run) == "finished"  # training ended; only the report is missing
    assert [s for s, _ in list_checkpoints(run / "checkpoints")][-1] == 6


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    run = tmp_path_factory.mktemp("disk_faults") / "run"
    Trainer(compose([*TINY, f"run_dir={run}"])).run()
    GlobalHydra.instance().clear()
    shutil.rmtree(run / "checkpoints")  # the report needs the logs only
    return run


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_report_on_a_full_or_read_only_folder(disk, rel, finished_run, fault):
    d = disk()
    run = d.root / "run"
    shutil.copytree(finished_run, run)
    d.fill() if fault == "full" else d.read_only()
    out = rel.cli("report", str(run), env=d.env)
    line = one_line_74(out.returncode, out.stderr)
    assert ("no space left" if fault == "full" else "read-only file system") in line


def test_image_folder_on_a_read_only_mount(disk, rel, tmp_path):
    """The dataset is read from a read-only mount (common on clusters): the decoded-image
    cache is skipped with a warning and the run trains."""
    from PIL import Image

    d = disk()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in ("a", "b"):
            folder = d.root / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    d.read_only()
    out = rel.cli("train", *TINY, "trainer.iterations=2", "dataset=imagefolder",
                  f"dataset.root={d.root / 'images'}", "dataset.n1=2", "dataset.m1=2",
                  "dataset.gamma_l=1", "dataset.gamma_u=1", f"run_dir={tmp_path / 'run'}",
                  env=d.env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "could not write the decoded-image cache" in out.stderr
    assert status(tmp_path / "run") == "finished"
