"""``prep``: wheels and CIFAR-10 into ``.device/`` for the GPU machine (run here)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from imbssl.bench.validate.common import CARRY_LIMIT_MIB, DEVICE_DIR, WHEELS


def tree_bytes(repo: Path) -> int:
    """Bytes of the tracked and untracked-not-ignored files (what the device tool sends)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    paths = [repo / p for p in out.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def git_commit_of(repo: Path) -> dict:
    """HEAD of ``repo`` and whether tracked files differ from it."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def prep(shared: Path, repo: Path, limit_mib: float = CARRY_LIMIT_MIB) -> dict:
    """Copy the Hydra wheels and the CIFAR-10 JPEG npz (+ materialize.py) into .device/."""
    from imbssl.errors import UserError

    dest = repo / DEVICE_DIR
    wheels = sorted(p for p in (shared / "device-wheels").glob("*.whl")
                    if p.name.startswith(WHEELS))
    data = sorted((shared / "data").glob("cifar10_*_jpeg.npz"))
    tool = shared / "data" / "materialize.py"
    if len(wheels) != len(WHEELS) or len(data) != 2 or not tool.is_file():
        raise UserError(f"{shared} lacks device-wheels/{{{','.join(WHEELS)}}}*.whl or "
                        "data/cifar10_{train,test}_jpeg.npz + materialize.py")
    for sub, files in (("wheels", wheels), ("data", [*data, tool])):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / sub / f.name)
    (dest / "source.json").write_text(json.dumps(git_commit_of(repo)) + "\n")
    carried = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()
                  and not p.is_relative_to(dest / "site") and not p.is_relative_to(
                      dest / "datasets"))
    total = tree_bytes(repo) + carried
    if total > limit_mib * 2**20:
        raise UserError(f"the working tree + {DEVICE_DIR}/ is {total / 2**20:.1f} MiB, over "
                        f"the device tool's {limit_mib} MiB; remove untracked files")
    return {"dir": str(dest), "carried_mib": carried / 2**20, "total_mib": total / 2**20}
