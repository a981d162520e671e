"""Bit-identical training: a short digits-LT run of every registered algorithm (with and
without DASO where a refiner applies, and the variants that exercise the trainer's hooks) gives
exactly the final metrics, log files and checkpoint tensors recorded in ``golden_runs.json``.

The values were recorded before the trainer was split into modules (issue 26), so the split
and every later restructuring of the engine is proven not to change a single bit. A change
that is *meant* to change numbers (a corrected estimator, a new default) re-records the cases
it affects, and its commit says so:

    PYTHONPATH=. python tests/engine/test_refactor_golden.py --record acr acr_daso
    PYTHONPATH=. python tests/engine/test_refactor_golden.py --record      # every case
    PYTHONPATH=. python tests/engine/test_refactor_golden.py --list

Bits depend on the CPU and the torch build, so the comparison runs only where the values were
recorded with the same torch version and machine type (elsewhere the test skips, saying so);
runs use one thread.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).with_name("golden_runs.json")

#: the short run every case trains: 18 steps, evaluation every 6, one checkpoint at the end
SHORT = ["dataset=digits_lt", "model=small_cnn", "model.ema_decay=0.7", "trainer=default",
         "trainer.iterations=18", "trainer.batch_size=8", "trainer.eval_interval=6",
         "trainer.log_interval=3", "trainer.checkpoint_interval=18",
         "trainer.keep_checkpoints=1", "trainer.progress=false", "trainer.tensorboard=false",
         "trainer.report=false", "trainer.precision=fp32", "trainer.compile=false",
         "device=cpu", "seed=3"]
DASO = ["pseudo=daso_quick", "pseudo.warmup_iters=4", "pseudo.dist_window=4"]


def _cases() -> dict[str, list[str]]:
    """case name -> overrides: every registered algorithm without a refiner, with DASO where
    it applies (the algorithm trains on unlabeled data), and the hook variants."""
    from imbssl.algorithms import registry

    cases: dict[str, list[str]] = {}
    for name, cls in sorted(registry().items()):
        if name == "crt":
            continue  # needs a finished run to start from (below)
        cases[name] = [f"algorithm={name}", "pseudo=none"]
        if cls.needs_validation:  # e.g. DARP's estimation run reads the validation set
            cases[name].append("dataset.num_valid_per_class=2")
        if cls.unlabeled_views:
            cases[f"{name}_daso"] = [f"algorithm={name}", *DASO]
    cases["crest_remixmatch"] = ["algorithm=crest", "algorithm.base=remixmatch", "pseudo=none"]
    for base in ("mixmatch", "remixmatch"):  # CoSSL's other bases (learner per base)
        cases[f"cossl_{base}"] = ["algorithm=cossl", f"algorithm.base={base}", "pseudo=none"]
        cases[f"cossl_{base}_daso"] = ["algorithm=cossl", f"algorithm.base={base}", *DASO]
    cases["cdmad_remixmatch"] = ["algorithm=cdmad", "algorithm.base=remixmatch",
                                 "algorithm.dist_align=labeled", "algorithm.epoch_iters=4",
                                 "algorithm.debias_after_epochs=1", "pseudo=none"]
    cases["cdmad_remixmatch_daso"] = [*cases["cdmad_remixmatch"][:-1], *DASO]
    cases["crest_la_posthoc"] = ["algorithm=crest", "algorithm.logit_adjust=posthoc",
                                 "pseudo=none"]
    cases["fixmatch_la_loss"] = ["algorithm=fixmatch", "algorithm.logit_adjust=loss",
                                 "pseudo=none"]
    cases["fixmatch_la_posthoc"] = ["algorithm=fixmatch", "algorithm.logit_adjust=posthoc",
                                    "pseudo=none"]
    cases["fixmatch_darp"] = ["algorithm=fixmatch", "pseudo=darp", "pseudo.per_iters=2"]
    cases["tras_student"] = ["algorithm=tras", "algorithm.epoch_iters=3",
                             "algorithm.warmup_epochs=1", "pseudo=none"]
    cases["cpe_classwise_bn"] = ["algorithm=cpe", "model.classwise_bn=3", "pseudo=none"]
    cases["crt"] = ["algorithm=crt", "pseudo=none", "algorithm.init_from=<fixmatch>"]
    cases["simpro_prior_steps"] = ["algorithm=simpro", "algorithm.epoch_iters=6", "pseudo=none"]
    return cases


def _digest(value) -> str:
    """sha256 over a nested checkpoint value: tensors by dtype, shape and bytes; the rest by
    exact repr."""
    h = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, list | tuple):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


#: metrics keys that later changes added to every evaluation row (issue 27: the post-hoc LA
#: accuracy is logged by every run); they are left out of the comparison, which keeps the
#: recorded rows exactly (json.dumps of the same keys in the same order gives the same bytes)
ADDED_METRICS = ("top1_posthoc_la", "balanced_acc_posthoc_la")


#: algorithm buffers that later changes added (issue 27: CReST keeps the initial labeled
#: counts to recompute LA's prior per generation); left out of the checkpoint comparison
ADDED_BUFFERS = ("initial_labeled_counts",)


def _without_added(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.split("/")[-1] not in ADDED_METRICS}


def _file_digest(path: Path) -> str:
    if path.suffix != ".jsonl":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    text = "".join(json.dumps(_without_added(row)) + "\n" for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def run_case(name: str, overrides: list[str], workdir: Path) -> dict:
    """Train one case in ``workdir/<name>`` (in this process, one thread) and return its
    digests: final metrics (exact), the log files, each part of the last checkpoint."""
    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    if "algorithm.init_from=<fixmatch>" in overrides:  # cRT re-trains a finished run
        init = workdir / f"{name}_init"
        if not init.is_dir():
            run_case(init.name, _cases()["fixmatch"], workdir)
        overrides = [o.replace("<fixmatch>", str(init)) for o in overrides]
    run_dir = workdir / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(compose([*SHORT, *overrides, f"run_dir={run_dir}"]))
        summary = trainer.run()
    finally:
        torch.set_num_threads(threads)
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["eval_history"] = _without_added(state["eval_history"])
    state["algorithm_buffers"] = {k: v for k, v in state["algorithm_buffers"].items()
                                  if k not in ADDED_BUFFERS}
    return {
        "final": {k: repr(v) for k, v in sorted(_without_added(summary["final"]).items())},
        "files": {f: _file_digest(run_dir / f) for f in ("metrics.jsonl", "per_class.csv")},
        "checkpoint": {k: _digest(v) for k, v in sorted(state.items())
                       if k != "checksum"},  # derived from the rest
    }


def _environment() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine()}


def _load() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"cases": {}}


def _golden_case(name: str) -> dict:
    golden = _load()
    env = golden.get("environment", {})
    if env != _environment():
        pytest.skip(f"golden values were recorded with {env}, this is {_environment()}: "
                    "bits are compared only on the same torch build and machine type")
    if name not in golden["cases"]:
        pytest.fail(f"no golden values for {name}; record them: python {__file__} --record "
                    f"{name}")
    return golden["cases"][name]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("name", sorted(_cases()))
def test_short_run_is_bit_identical_to_the_recorded_one(name, workdir):
    expected = _golden_case(name)
    got = run_case(name, _cases()[name], workdir)
    assert got["final"] == expected["final"], "final metrics differ"
    assert got["files"] == expected["files"], "metrics.jsonl / per_class.csv differ"
    recorded = expected["checkpoint"]  # parts added to checkpoints later are not compared
    differ = sorted(k for k in recorded if got["checkpoint"].get(k) != recorded[k])
    assert not differ, f"checkpoint parts differ: {differ}"


def _record(names: list[str]) -> None:
    cases = _cases()
    names = names or sorted(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {sorted(cases)}", file=sys.stderr)
        raise SystemExit(2)
    golden = _load()
    if golden.get("environment", _environment()) != _environment() and set(names) != set(cases):
        print(f"the golden file was recorded with {golden['environment']}; re-record every "
              "case on this machine (--record without names)", file=sys.stderr)
        raise SystemExit(2)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result = run_case(name, cases[name], Path(tmp))
            result["recorded_at"] = commit + ("+changes" if dirty else "")
            golden["cases"][name] = result
            print(f"recorded {name}", file=sys.stderr)
    golden["environment"] = _environment()
    golden["cases"] = dict(sorted(golden["cases"].items()))
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--list"]:
        print("\n".join(sorted(_cases())))
    elif args[:1] == ["--record"]:
        _record(args[1:])
    else:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
