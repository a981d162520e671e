"""A run killed with SIGKILL after a checkpoint and resumed ends exactly like an
uninterrupted run: the same final checkpoint, tensor for tensor (weights, EMA, optimizer,
generators, streams, DASO queues and m_hat window, SimMatch bank, distribution-alignment
history, tracker, ...), and the same metrics.jsonl, per_class.csv, summary.json and
confusion_test.npy, byte for byte.

Every process (reference, killed, resumed, for each case) is a real CLI run; the cases run
in waves of WAVE: a wave's reference and killed runs at once, then its resumes.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

# slow: multi-process / subprocess training (`pytest -m slow`; CI runs them)
pytestmark = pytest.mark.slow

ITERS, KILL_AFTER = 20, 8  # kill once the checkpoint of step 8 exists and step 10 is logged
COMMON = [f"trainer.iterations={ITERS}", "trainer.batch_size=8", "trainer.eval_interval=4",
          "trainer.log_interval=2", "trainer.checkpoint_interval=4", "trainer.keep_checkpoints=2",
          "trainer.deterministic=true", "dataset.n1=30", "dataset.m1=60"]
CASES = {
    # DASO active from step 2, m_hat recomputed every 3 steps (a window is half full at every
    # checkpoint), queues of 8 per class wrap around; the official DASO recipe (EMA warm-up,
    # averaged buffers, EMA network in train mode)
    "fixmatch_daso": ["algorithm=fixmatch", "pseudo=daso", "recipe=daso_official",
                      "pseudo.warmup_iters=2",
                      "pseudo.dist_window=3", "pseudo.queue_size=8", "algorithm.threshold=0.5"],
    # labeled bank + distribution alignment over a 3-batch window
    "simmatch": ["algorithm=simmatch", "pseudo=none", "algorithm.dist_align_window=3",
                 "algorithm.threshold=0.5"],
    # generations of 5 steps: labeled-set updates + restarts after steps 5, 10, 15
    "crest_plus": ["algorithm=crest_plus", "pseudo=none", "algorithm.generations=4",
                   "algorithm.threshold=0.5"],
    # CReST+ with ReMixMatch as the learner: tempered DA target, ramp-up restarting per generation
    "crest_plus_remixmatch": ["algorithm=crest_plus", "algorithm.base=remixmatch", "pseudo=none",
                              "algorithm.generations=4", "algorithm.uratio=1"],
    "crt": ["algorithm=crt", "pseudo=none"],  # class-aware labeled stream, frozen encoder
    # LA loss + DARP: per-image pseudo-labels stored and re-solved every 3 steps from step 5
    "fixmatch_la_darp": ["algorithm=fixmatch", "pseudo=darp", "algorithm.logit_adjust=loss",
                         "pseudo.warmup_ratio=0.2", "pseudo.per_iters=3", "algorithm.threshold=0.5"],
    "meanteacher": ["algorithm=meanteacher", "pseudo=none", "algorithm.logit_adjust=posthoc"],
    "pseudolabel": ["algorithm=pseudolabel", "pseudo=none", "algorithm.threshold=0.5"],
    # ABC + DASO: Bernoulli masks (RNG), gradual schedule moving every 4 steps
    "abc_daso": ["algorithm=abc", "pseudo=daso", "pseudo.warmup_iters=2", "pseudo.queue_size=8",
                 "algorithm.threshold=0.5", "algorithm.epoch_iters=4"],
    # ACR: estimate and KL sum from step 3, tau updated every 3 steps (mid-epoch at the kill)
    "acr": ["algorithm=acr", "pseudo=none", "algorithm.epoch_iters=3",
            "algorithm.estimate_after_epochs=0", "algorithm.threshold=0.5"],
}
# cases run at once: each starts two training processes (reference and killed), so a wave
# never starts more processes than the machine has cores (one case on a two-core machine)
WAVE = max(1, (os.cpu_count() or 2) // 2)
WAIT = 360  # seconds per phase of a wave (a loaded two-core machine)
FILES = ("metrics.jsonl", "per_class.csv", "summary.json", "confusion_test.npy")


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    steps = []
    for line in text[: text.rfind("\n") + 1].splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass
    return steps


def _run_wave(root: Path, rel, names: list[str]):
    """Reference and killed runs of ``names`` at once, the kill after KILL_AFTER, then the
    resumes."""
    args = {name: [*COMMON, *CASES[name], *rel.QUIET] for name in names}
    procs = {}
    for name in names:
        for kind in ("ref", "kill"):
            (root / name).mkdir(exist_ok=True)
            procs[name, kind] = rel.launch("train", *args[name], f"run_dir={root / name / kind}",
                                           log=root / name / f"{kind}.log")
    at_kill = {}
    deadline = time.monotonic() + WAIT
    while len(at_kill) < len(names) and time.monotonic() < deadline:
        for name in names:
            if name in at_kill:
                continue
            run, proc = root / name / "kill", procs[name, "kill"]
            ckpt = run / "checkpoints" / f"ckpt_{KILL_AFTER:08d}.pt"
            if ckpt.exists() and max(_logged_steps(run), default=0) > KILL_AFTER:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                at_kill[name] = {
                    "returncode": proc.returncode,
                    "final_ckpt": (run / "checkpoints" / f"ckpt_{ITERS:08d}.pt").exists(),
                    "last_logged": max(_logged_steps(run)),
                    "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
                }
            elif proc.poll() is not None:
                at_kill[name] = {"returncode": proc.returncode, "final_ckpt": True,
                                 "last_logged": max(_logged_steps(run), default=0),
                                 "checkpoints": []}
        time.sleep(0.003)
    for proc in procs.values():
        proc.wait(timeout=WAIT)
    resumed = {name: rel.launch("train", *args[name], f"run_dir={root / name / 'kill'}",
                                "resume=true", log=root / name / "resume.log")
               for name in names}
    for proc in resumed.values():
        proc.wait(timeout=WAIT)
    return procs, resumed, at_kill


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rel):
    root = tmp_path_factory.mktemp("exact_resume")
    procs, resumed, at_kill = {}, {}, {}
    names = list(CASES)
    for i in range(0, len(names), WAVE):
        p, r, k = _run_wave(root, rel, names[i:i + WAVE])
        procs.update(p)
        resumed.update(r)
        at_kill.update(k)
    return root, procs, resumed, at_kill


@pytest.mark.parametrize("name", list(CASES))
def test_killed_and_resumed_run_equals_uninterrupted_run(runs, rel, name):
    root, procs, resumed, at_kill = runs
    ref, run = root / name / "ref", root / name / "kill"
    logs = {k: (root / name / f"{k}.log").read_text() for k in ("ref", "kill", "resume")}
    assert procs[name, "ref"].returncode == 0, logs["ref"][-3000:]
    info = at_kill[name]
    assert info["returncode"] == -signal.SIGKILL, (info, logs["kill"][-3000:])
    assert not info["final_ckpt"], f"the run ended before it could be killed: {info}"
    assert resumed[name].returncode == 0, logs["resume"][-3000:]
    resumed_at = int(logs["resume"].split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_at >= KILL_AFTER
    # the kill came at or after the resumed checkpoint (a fast run on a loaded machine can be
    # killed exactly at a later checkpoint step; rows logged after it are dropped on resume)
    assert info["last_logged"] >= resumed_at, info

    final = f"checkpoints/ckpt_{ITERS:08d}.pt"
    a = torch.load(ref / final, weights_only=True)
    b = torch.load(run / final, weights_only=True)
    assert rel.differences(a, b) == []
    for fname in FILES:
        assert (ref / fname).read_bytes() == (run / fname).read_bytes(), fname

    # the state that makes this test meaningful was really in play at the kill
    mid = torch.load(run / "checkpoints" / f"ckpt_{ITERS:08d}.pt", weights_only=True)
    algo = mid["algorithm"]
    if name == "fixmatch_daso":
        assert int(algo["refiner.num_observed"]) == ITERS
        assert int(algo["refiner.queue_len"].min()) > 0  # every class queued
        assert not torch.allclose(algo["refiner.m_hat"], torch.full((10,), 0.1))
        assert any(r.get("loss/daso_align") for r in map(json.loads,
                   (run / "metrics.jsonl").read_text().splitlines()))
    elif name == "crest_plus":
        assert len(mid["labeled_added"]["indices"]) > 0
    elif name == "fixmatch_la_darp":  # re-solved after the resume, every image stored
        assert bool(algo["refiner.seen"].any())  # stored rows, solved at steps 6, 9, ..., 18
        assert not torch.allclose(algo["refiner.pseudo_refine"], torch.full((1,), 0.1))
    elif name == "simmatch":
        assert int(algo["dist_align.count"]) == ITERS
        assert 0 < int(algo["bank_filled"].sum()) < len(algo["bank_filled"]) or \
            bool(algo["bank_filled"].all())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == ITERS
