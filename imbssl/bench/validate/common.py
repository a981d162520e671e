"""Constants, the result records and the run context shared by every check."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SETTING = "cifar10_lt_g100_n1500"  # DASO Table 1: CIFAR-10-LT, gamma 100, N1 1500, M1 3000
BENCH_ROWS = (f"{SETTING}_fixmatch", f"{SETTING}_fixmatch_daso")
TRAIN_ROW = f"{SETTING}_fixmatch_daso"
SMOKE_ROWS = tuple(f"{SETTING}_{algo}{daso}" for algo in ("fixmatch", "mixmatch", "remixmatch",
                                                         "simmatch") for daso in ("", "_daso"))
SUPERVISED = ("supervised", ["dataset=cifar10_lt", "model=wrn28_2", "algorithm=supervised",
                             "pseudo=none", "trainer=daso_protocol"])
# issue 21: the GPU script reports fp32 and bf16 (imbssl/engine/trainer.py: auto|bf16|fp16|fp32)
PRECISIONS = ("fp32", "bf16")
AUG_TOLERANCE = 1e-3  # strong views: at most this fraction of pixels may differ CPU vs CUDA
AUG_IMAGES = 512
# what the device tool carries (tracked files + .device/) and its limit
CARRY_LIMIT_MIB = 64
DEVICE_DIR = ".device"
WHEELS = ("hydra_core", "omegaconf", "antlr4")
SHARED = Path("/work/shared")
# the CPU dry run: digits-LT, the small CNN, a batch of 8 (overrides appended to every case)
DRY_RUN_OVERRIDES = ["dataset=digits_lt", "dataset.n1=30", "dataset.m1=90",
                     "dataset.gamma_l=10", "dataset.gamma_u=10", "model=small_cnn",
                     "trainer.batch_size=8", "trainer.compile=false", "device=cpu"]
GPU = {"steps": 30, "sync_steps": 3, "bench_iters": 50, "bench_warmup": 20, "train_s": 300,
       "budget_s": 420}
DRY = {"steps": 2, "sync_steps": 1, "bench_iters": 2, "bench_warmup": 1, "train_s": 120,
       "budget_s": 900}
SMOKE_CASE_S = {"gpu": 25.0, "dry": 0.0}  # start a smoke case only with this much time left
BENCH_RESERVE_S = 200.0  # start the bench only with this much budget left (GPU)
FINISH_RESERVE_S = 15.0  # kept for writing the results


def passed(**details) -> dict:
    return {"status": "passed", **details}


def failed(error: str, **details) -> dict:
    return {"status": "failed", "error": error, **details}


def skipped(reason: str, **details) -> dict:
    return {"status": "skipped", "reason": reason, **details}


def error_text(exc: BaseException) -> str:
    """The exception in one line: type, first line of the message."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:500]


def innermost_frame(tb_or_stack, package: str = "imbssl") -> str | None:
    """'path:line in function' of the innermost frame inside ``package`` (else the last)."""
    frames = list(tb_or_stack)
    ours = [f for f in frames if f"/{package}/" in f.filename] or frames
    if not ours:
        return None
    f = ours[-1]
    name = f.filename.split(f"/{package}/", 1)[-1] if f"/{package}/" in f.filename else f.filename
    return f"{package}/{name}:{f.lineno} in {f.name}"


@dataclass
class Context:
    """Settings of one validation run (GPU or CPU dry run)."""

    dry: bool
    out: Path
    work: Path
    data_root: str
    extra: list[str]
    steps: int
    sync_steps: int
    bench_iters: int
    bench_warmup: int
    train_s: float
    budget_s: float
    bench_rows: list[str]
    train_row: str
    smoke_rows: list[str]
    precisions: list[str]
    compile_modes: list[bool]
    only: set[str]
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - (time.monotonic() - self.started)

    def shrink(self) -> list[str]:
        """Overrides appended to every case: the dry run's tiny setting, or the data root."""
        return list(DRY_RUN_OVERRIDES) if self.dry else [f"dataset.root={self.data_root}",
                                                         "device=cuda"]
