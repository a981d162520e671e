"""Train the official DASO code (github.com/ytaek-oh/daso) at the CPU mini protocol, resumably.

    python analysis/official_daso_run.py --official /path/to/daso-checkout \\
        --method fixmatch_daso --seed 0 --run-dir analysis/results/official_side_by_side_runs/x

Run from the repository root (the run folder and ``datasets/`` are read relative to it).
``--official`` is a checkout of ytaek-oh/daso at ``PINNED_COMMIT``; the script refuses any
other (git HEAD when it is a git checkout, and always the git blob hashes of the files in
``PINNED_BLOBS``). The checkout is never edited: ``lib/`` and its config files are copied to a
scratch folder (a fresh temporary directory, deleted at exit), the two text shims below are
applied to the copy, and the official ``main.py`` path is run from it (on ``sys.path``) (``get_cfg``,
``merge_from_file``, ``merge_from_list``, ``default_setup``, ``algorithm.<NAME>(cfg)``,
``train()``) in this process.

Shims, every one of them:

1. text, ``lib/models/losses/accuracy.py``: ``correct[:k].view(-1)`` -> ``.reshape(-1)``
   (``correct`` is a transposed, non-contiguous tensor; a current torch refuses ``view``).
2. text, ``lib/algorithm/fixmatch.py``: ``logits_weak.detach_()`` -> ``.detach()`` (an
   in-place detach of a view of the concatenated logits; a current torch refuses it). The
   value is the same; the logits never needed a gradient through this path.
3. run time, ``cfg.GPU_ID = "cpu"`` set after the merge (yacs' merge refuses a string for an
   integer key): every ``.to(cfg.GPU_ID)`` of the official code goes to the CPU.
4. run time, ``torchvision.datasets.cifar.check_integrity`` only checks that the file exists:
   the local CIFAR copy is re-encoded (same arrays, other pickle bytes), so torchvision's md5
   check would fail and try to download. The runner checks instead that the official code trains on exactly
   the images of imbssl's ``dataset.split_protocol=official_daso`` split (image-hash sets of
   the labeled, unlabeled, validation and test sets; ``meta.json: same_images_as_imbssl``).
5. run time, WRN-16-1: ``lib.models.semi_model.build_wrn`` builds the official
   ``WRN(MODEL.WIDTH=1)`` and keeps the first two residual blocks of each of its three units
   (the official builder fixes 4 blocks per unit, depth 28; 2 per unit is depth 16). Every
   module left is the official one with its official initialisation.
6. run time, instrumentation without changing any computed value: the unlabeled batch's true
   labels are read off the loader's iterator, the final pseudo-labels and the confidence mask
   off the arguments of the unlabeled loss call, DASO's linear and semantic pseudo-labels off
   ``DistributionLogger.accumulate``, m_hat off ``DistributionLogger.get_pl_dist``, and the
   wall and CPU time of each ``run_step``; written to ``instrument.jsonl``.
7. run time, resuming: the official resume restores neither DASO's queue, m_hat, warm-up
   flag nor the meters' iteration, and restarts the samplers from their first batch. Every
   ``PERIODS.EVAL`` iterations (after the evaluation and the official ``metrics.json`` line)
   this runner saves model, EMA model, optimizer, scheduler, evaluation history, the
   distribution logger, the queue, the warm-up flag and the torch / numpy / python RNG states
   to ``<run-dir>/checkpoints/state.pt`` (first flushing the official ``metrics.json``, whose
   writer never flushes before the end); a restart rebuilds the trainer with the same seed
   (so the same initial weights and sampler orders), loads that state, drops the sampler
   indices already consumed and the log lines written after the checkpoint. The data loader's
   augmentation draws after a resume differ from an uninterrupted run (``meta.json: resumed``).
8. config, ``DATASET.NUM_WORKERS 0`` and ``torch.set_num_threads(1)``: one process, one thread
   (the official default is 8 loader worker processes); ``PERIODS.CHECKPOINT 0`` (item 7
   checkpoints instead; the official end-of-training ``model_final.pth.tar`` is still written).

The mini protocol's values (docs/mini_protocol.md) are set through the official config keys
(``MINI_PROTOCOL``): labeled batch 32, ratio 2, 2000 iterations, EMA decay 0.99, evaluation
and log every 100, WRN width 1 with ``MODEL.QUEUE.FEAT_DIM`` 64 (its feature width), DASO
warm-up 500, m_hat period 50, ``DIST_TEMP`` 0.3 (uniform setting); the uniform CIFAR-10-LT
setting (N1 1500, gamma_l 100, M1 3000, gamma_u 1, 5000 validation images) on top of the
official ``configs/cifar10/fixmatch.yaml`` / ``fixmatch_daso.yaml``.

At the end the run folder gets imbssl's records (``analysis/official_daso.py`` converts
``official_output/*/metrics.json`` and ``instrument.jsonl``: metrics.jsonl, per_class.csv,
summary.json, config.yaml, meta.json), so both codes go through the same aggregation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PINNED_REPO = "github.com/ytaek-oh/daso"
PINNED_COMMIT = "3541a6c452f895056f5fdac440b5d0c557dea9f0"
# git blob hashes at PINNED_COMMIT of the files this runner shims or depends on most
PINNED_BLOBS = {
    "lib/models/losses/accuracy.py": "7b481cfd44a02cd1aabfbb1c8fe8b790d046cb74",
    "lib/algorithm/fixmatch.py": "5bf074a6e8b17d27b11eae5ecd24853976570ddf",
    "lib/models/wrn.py": "eea501c1f7020d669cef77e00c6238d11624dbff",
    "lib/dataset/utils.py": "65114c68acd23e00b89ebf659e5b398b51048a48",
    "lib/dataset/cifar10.py": "572f322f6e963954f4a9805ec73967cf02c40b42",
    "lib/algorithm/daso.py": "8cea5608237ce08a4d509b9ca7c96043e6aac872",
    "lib/models/daso_model.py": "fd742a3b069db5c55626997fae745ecd46273be0",
    "lib/engine/base_trainer.py": "ed164cd8f2f82571a8d87bac117b55a3620da30f",
    "lib/algorithm/base_algorithm.py": "d6f8967e7e50e5fe77261c985ae31375056d8163",
    "lib/models/ema_model.py": "366f899ba46061d0d943a4f6a615fee9a7c0df65",
}
TEXT_SHIMS = (
    ("lib/models/losses/accuracy.py", "correct[:k].view(-1)", "correct[:k].reshape(-1)"),
    ("lib/algorithm/fixmatch.py", "p = logits_weak.detach_().softmax(dim=1)",
     "p = logits_weak.detach().softmax(dim=1)"),
)
CONFIG_FILES = {"fixmatch": "configs/cifar10/fixmatch.yaml",
                "fixmatch_daso": "configs/cifar10/fixmatch_daso.yaml"}
BLOCKS_PER_UNIT = 2  # WRN-16: (16 - 4) / 6
MINI_PROTOCOL = {
    "DATASET.ROOT": "datasets",
    "DATASET.NUM_WORKERS": 0,
    "DATASET.NUM_VALID": 5000,
    "DATASET.CIFAR10.NUM_LABELED_HEAD": 1500,
    "DATASET.CIFAR10.IMB_FACTOR_L": 100,
    "DATASET.CIFAR10.NUM_UNLABELED_HEAD": 3000,
    "DATASET.CIFAR10.IMB_FACTOR_UL": 1,
    "DATASET.REVERSE_UL_DISTRIBUTION": False,
    "SOLVER.IMS_PER_BATCH": 32,
    "SOLVER.UNLABELED_BATCH_RATIO": 2,
    "SOLVER.MAX_ITER": 2000,
    "MODEL.WIDTH": 1,
    "MODEL.EMA_DECAY": 0.99,
    "MODEL.QUEUE.FEAT_DIM": 64,
    "PERIODS.EVAL": 100,
    "PERIODS.LOG": 100,
    "PERIODS.CHECKPOINT": 0,
}
DASO_MINI = {
    "ALGORITHM.DASO.PRETRAIN_STEPS": 500,
    "ALGORITHM.DASO.PL_DIST_UPDATE_PERIOD": 50,
    "ALGORITHM.DASO.DIST_TEMP": 0.3,
}
MASK_WINDOW = 50  # imbssl trainer.log_interval of the mini protocol


class UserError(Exception):
    """A bad argument or checkout: one line on stderr, exit 2."""


# ----------------------------------------------------------------------------- the checkout
def git_blob_hash(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_checkout(official: Path) -> None:
    """Refuse a checkout that is not ytaek-oh/daso at PINNED_COMMIT."""
    if not (official / "lib" / "algorithm" / "daso.py").is_file():
        raise UserError(f"--official {official}: not a checkout of {PINNED_REPO} "
                        "(no lib/algorithm/daso.py)")
    if (official / ".git").exists():
        head = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        if head != PINNED_COMMIT:
            raise UserError(f"--official {official}: HEAD is {head or '?'}, this script pins "
                            f"{PINNED_COMMIT} (git -C {official} checkout {PINNED_COMMIT})")
    for rel, want in PINNED_BLOBS.items():
        have = git_blob_hash(official / rel) if (official / rel).is_file() else "missing"
        if have != want:
            raise UserError(f"--official {official}: {rel} differs from commit "
                            f"{PINNED_COMMIT[:10]} (blob {have[:10]}, expected {want[:10]})")


def scratch_copy(official: Path) -> Path:
    """lib/, configs/ and main.py copied to a temporary folder, the text shims applied."""
    scratch = Path(tempfile.mkdtemp(prefix="official_daso_"))
    shutil.copytree(official / "lib", scratch / "lib")
    shutil.copytree(official / "configs", scratch / "configs")
    shutil.copy(official / "main.py", scratch / "main.py")
    for rel, old, new in TEXT_SHIMS:
        text = (scratch / rel).read_text()
        if text.count(old) != 1:
            raise UserError(f"shim of {rel}: expected one '{old}', found {text.count(old)}")
        (scratch / rel).write_text(text.replace(old, new))
    return scratch


# ----------------------------------------------------------------------------- run-time shims
def install_runtime_shims() -> None:
    """Items 4 and 5 of the module docstring (the official modules must be importable)."""
    import lib.models.semi_model as semi_model
    import lib.models.wrn as wrn
    import torchvision
    from torch import nn

    cifar = sys.modules[torchvision.datasets.CIFAR10.__module__]
    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)

    def build_wrn16(cfg):
        net = wrn.WRN(cfg.MODEL.WIDTH, num_classes=cfg.MODEL.NUM_CLASSES)
        for name in ("unit1", "unit2", "unit3"):
            setattr(net, name, nn.Sequential(*list(getattr(net, name))[:BLOCKS_PER_UNIT]))
        return net

    semi_model.build_wrn = build_wrn16


def official_cfg(scratch: Path, method: str, seed: int, output_dir: Path,
                 extra_opts: list[str]):
    """The official config: the method's config file, then the mini protocol's keys."""
    from lib.config import get_cfg
    from lib.engine import default_setup

    cfg = get_cfg()
    cfg.merge_from_file(str(scratch / CONFIG_FILES[method]))
    values = dict(MINI_PROTOCOL, **(DASO_MINI if method == "fixmatch_daso" else {}))
    values.update({"SEED": seed, "OUTPUT_DIR": str(output_dir)})
    opts = [item for key, value in values.items() for item in (key, repr(value)
                                                                  if isinstance(value, str)
                                                                  else str(value))]
    opts += extra_opts
    cfg.merge_from_list(opts)
    args = argparse.Namespace(config_file=str(scratch / CONFIG_FILES[method]), eval_only=False,
                              opts=opts)
    cfg = default_setup(cfg, args)
    cfg.GPU_ID = "cpu"
    cfg.freeze()
    return cfg


# ----------------------------------------------------------------------------- instrumentation
class Recorder:
    """Reads what the official step computed (shim 6) and writes instrument.jsonl."""

    def __init__(self, trainer, path: Path, num_classes: int):
        import numpy as np

        self.np, self.trainer, self.path, self.k = np, trainer, path, num_classes
        self.window_reset()
        self.eval_reset()
        self.step_pl: dict = {}

    def window_reset(self):
        self.mask_sum = self.mask_n = 0.0
        self.wall = self.cpu = 0.0
        self.steps = 0

    def eval_reset(self):
        self.conf = {kind: self.np.zeros((self.k, self.k), dtype=int)
                     for kind in ("linear", "semantic", "final")}

    def tap_unlabeled_iterator(self, iterator):
        recorder = self

        class Tap:
            def __iter__(self):
                return self

            def __next__(self):
                batch = next(iterator)
                recorder.step_pl["truth"] = batch[1].detach().cpu().numpy().astype(int)
                return batch

        return Tap()

    def tap_loss(self, loss):
        def tapped(pred, target, *args, weight=None, **kwargs):
            if weight is not None and target.ndim == 1:
                self.step_pl["final"] = target.detach().cpu().numpy().astype(int)
                self.step_pl["mask"] = weight.detach().float().cpu().numpy()
            return loss(pred, target, *args, weight=weight, **kwargs)

        return tapped

    def tap_accumulate(self, accumulate):
        def tapped(dist_dict):
            for key, kind in (("linear_pl", "linear"), ("sem_pl", "semantic")):
                if dist_dict.get(key) is not None:
                    self.step_pl[kind] = dist_dict[key].detach().cpu().numpy().astype(int)
            return accumulate(dist_dict)

        return tapped

    def wrap_run_step(self, run_step):
        def timed():
            self.step_pl = {}
            wall, cpu = time.perf_counter(), time.process_time()
            run_step()
            self.after_step(time.perf_counter() - wall, time.process_time() - cpu)

        return timed

    def after_step(self, wall: float, cpu: float):
        step = self.trainer.iter + 1
        pl = self.step_pl
        self.wall, self.cpu, self.steps = self.wall + wall, self.cpu + cpu, self.steps + 1
        if "mask" in pl:
            self.mask_sum += float(pl["mask"].sum())
            self.mask_n += len(pl["mask"])
        truth = pl.get("truth")
        if truth is not None:
            if "linear" not in pl and "final" in pl:  # FixMatch: the final label is the linear
                pl["linear"] = pl["final"]
            for kind, conf in self.conf.items():
                labels = pl.get(kind)
                if labels is not None and (labels >= 0).all():  # semantic: -1 in warm-up
                    self.np.add.at(conf, (truth, labels), 1)
        if step % min(MASK_WINDOW, self.trainer.cfg.PERIODS.EVAL) == 0:
            self.write({"step": step, "kind": "train",
                        "mask_ratio": self.mask_sum / self.mask_n if self.mask_n else None,
                        "step_wall_s": self.wall / self.steps, "step_cpu_s": self.cpu / self.steps})
            self.window_reset()
        if step % self.trainer.cfg.PERIODS.EVAL == 0:
            row = {"step": step, "kind": "pseudo",
                   "confusion": {k: c.tolist() for k, c in self.conf.items() if c.sum()}}
            if hasattr(self.trainer.model, "queue"):  # DASO: m_hat used by the next steps
                row["m_hat"] = [float(v) for v in self.trainer.dist_logger.get_pl_dist()]
            self.write(row)
            self.eval_reset()

    def write(self, row: dict):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- checkpoints
def trainer_state(trainer) -> dict:
    import numpy as np
    import torch

    model = trainer.model
    state = {
        "iter": trainer.iter + 1, "model": model.state_dict(),
        "ema_model": trainer.ema_model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "eval_history": dict(trainer.eval_history),
        "dist_logger": {k: getattr(trainer.dist_logger, k)
                        for k in ("_pl_total_list", "_pl_dist")},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()},
    }
    if hasattr(model, "queue"):
        state["daso"] = {"pretraining": model.pretraining, "bank": dict(model.queue._bank),
                         "prototypes": model.queue.prototypes}
    return state


def save_state(trainer, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(trainer_state(trainer), tmp)
    os.replace(tmp, path)


def load_state(trainer, state: dict) -> int:
    """Everything of ``trainer_state`` back into a freshly built trainer; the next iteration."""
    import numpy as np
    import torch

    start = int(state["iter"])
    trainer.model.load_state_dict(state["model"])
    trainer.ema_model.load_state_dict(state["ema_model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.eval_history.clear()
    trainer.eval_history.update(state["eval_history"])
    for key, value in state["dist_logger"].items():
        setattr(trainer.dist_logger, key, value)
    if "daso" in state:
        trainer.model.pretraining = state["daso"]["pretraining"]
        trainer.model.queue._bank.update(state["daso"]["bank"])
        trainer.model.queue.prototypes = state["daso"]["prototypes"]
    trainer.start_iter = start
    trainer.meters._iter = start
    for loader in (trainer.l_loader, trainer.ul_loader):
        loader.sampler._indices = loader.sampler._indices[start * loader.batch_size:]
    trainer._l_iter, trainer._ul_iter = iter(trainer.l_loader), iter(trainer.ul_loader)
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return start


class CheckpointWriter:
    """An official ``Writer``: called after each evaluation's log lines; saves the state."""

    def __init__(self, trainer, path: Path):
        self.trainer, self.path = trainer, path

    def write(self, meters) -> None:
        for writer in self.trainer.writers:  # the official JSONWriter never flushes
            handle = getattr(writer, "_file_handle", None)
            if handle is not None:
                handle.flush()
        save_state(self.trainer, self.path)

    def close(self) -> None:
        pass


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Drop the lines of ``path`` whose ``key`` is past ``last`` (written after a checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get(key, 0) <= last:
                keep.append(line)
        except ValueError:
            pass
    path.write_text("".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- same images
def image_digests(images) -> list[str]:
    """Sorted per-image sha1 digests of uint8 HWC images (a set that ignores order)."""
    return sorted(hashlib.sha1(img.tobytes()).hexdigest() for img in images)


def same_images_as_imbssl(trainer, seed: int) -> dict:
    """Whether the official datasets hold the images of imbssl's official_daso split."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from imbssl.data import load_source, make_official_daso_split

    src = load_source("cifar10", ROOT / "datasets")
    split = make_official_daso_split(src.train_labels, 1500, 100, 3000, 1,
                                     num_valid_per_class=500, seed=seed)
    parts = {"labeled": (trainer.l_loader, split.labeled),
             "unlabeled": (trainer.ul_loader, split.unlabeled),
             "valid": (trainer.valid_loader, split.valid)}
    out = {}
    for name, (loader, idx) in parts.items():
        official = np.asarray(loader.dataset.dataset["images"]).astype(np.uint8)
        out[name] = image_digests(official) == image_digests(src.train_images[idx])
    official_test = np.asarray(trainer.test_loader.dataset.dataset["images"]).astype(np.uint8)
    out["test"] = image_digests(official_test) == image_digests(src.test_images)
    return out


# ----------------------------------------------------------------------------- main
def run(official: Path, method: str, seed: int, run_dir: Path, extra_opts: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    check_checkout(official)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "official_output"
    done = out_dir / "done.json"
    if not done.is_file():
        train(official, method, seed, run_dir, out_dir, extra_opts)
    from official_daso import convert_run  # analysis/official_daso.py, beside this file

    convert_run(run_dir)
    return 0


def train(official: Path, method: str, seed: int, run_dir: Path, out_dir: Path,
          extra_opts: list[str]) -> None:
    import torch

    scratch = scratch_copy(official)
    try:
        sys.path.insert(0, str(scratch))
        install_runtime_shims()
        cfg = official_cfg(scratch, method, seed, out_dir, extra_opts)
        import lib.algorithm as algorithm

        ckpt = run_dir / "checkpoints" / "state.pt"
        metrics = Path(cfg.OUTPUT_DIR) / "metrics.json"
        instrument = run_dir / "instrument.jsonl"
        state = torch.load(ckpt, weights_only=False) if ckpt.is_file() else None
        if state is None:  # a fresh start: no log lines of an earlier attempt
            for path in (metrics, instrument, run_dir / "run_attempts.jsonl"):
                path.unlink(missing_ok=True)
        else:
            truncate_jsonl(metrics, "iteration", state["iter"])
            truncate_jsonl(instrument, "step", state["iter"])
        trainer = algorithm.__dict__[cfg.ALGORITHM.NAME](cfg)
        images = same_images_as_imbssl(trainer, seed) if state is None else None
        recorder = Recorder(trainer, instrument, cfg.MODEL.NUM_CLASSES)
        trainer.ul_loss = recorder.tap_loss(trainer.ul_loss)
        trainer.dist_logger.accumulate = recorder.tap_accumulate(trainer.dist_logger.accumulate)
        trainer.writers.append(CheckpointWriter(trainer, ckpt))
        start = load_state(trainer, state) if state is not None else 0
        trainer._ul_iter = recorder.tap_unlabeled_iterator(trainer._ul_iter)
        trainer.run_step = recorder.wrap_run_step(trainer.run_step)
        log_attempt(run_dir, start, images, cfg, trainer, extra_opts)
        t0, c0 = time.time(), time.process_time()
        trainer.train()
        attempt = {"start_iter": start, "wall_s": time.time() - t0,
                   "cpu_s": time.process_time() - c0}
        (out_dir / "done.json").write_text(json.dumps(attempt, indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def class_counts(dataset, num_classes: int) -> list[int]:
    counts = dict(dataset.num_samples_per_class)
    return [int(counts.get(c, 0)) for c in range(num_classes)]


def log_attempt(run_dir: Path, start: int, images: dict | None, cfg, trainer,
                extra_opts: list[str]) -> None:
    """One line per start or resume in run_attempts.jsonl (read by the conversion)."""
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                            "analysis/official_daso_run.py"], capture_output=True,
                           text=True).stdout.strip()
    k = cfg.MODEL.NUM_CLASSES
    row = {"start_iter": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "git_commit": commit, "runner_dirty": bool(dirty),
           "official_commit": PINNED_COMMIT, "torch": torch.__version__,
           "num_threads": torch.get_num_threads(),
           "official_output": str(Path(cfg.OUTPUT_DIR).name), "extra_opts": extra_opts,
           "labeled_counts": class_counts(trainer.l_loader.dataset, k),
           "unlabeled_counts": class_counts(trainer.ul_loader.dataset, k)}
    if images is not None:
        row["same_images_as_imbssl"] = images
    with open(run_dir / "run_attempts.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, required=True, help="checkout of ytaek-oh/daso")
    p.add_argument("--method", choices=sorted(CONFIG_FILES), required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="more official config keys after the mini protocol's (smoke tests)")
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        print("error: --opts takes KEY VALUE pairs", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return run(args.official.resolve(), args.method, args.seed, args.run_dir, args.opts)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
