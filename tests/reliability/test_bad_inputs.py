"""Every bad input: exit code 2, one line on stderr that names the bad value (no traceback),
and an existing run folder left exactly as it was (every file hashed before and after).

Most cases run ``imbssl.cli.main`` in-process (they fail while the config is composed and
checked, before Hydra starts); ``test_real_processes`` runs a few as real processes.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

from imbssl.cli import main

TINY = ["trainer.iterations=4", "trainer.batch_size=8", "trainer.eval_interval=2",
        "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.report=false", "device=cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run folder, datasets good and bad, and other folders the cases point at."""
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    Trainer(compose([*TINY, f"run_dir={run}"])).run()
    GlobalHydra.instance().clear()
    # what Hydra wrote at the first launch: a refused launch must not rewrite it
    (run / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# {name} of the first launch\n")
    (run / "cli.log").write_text("log of the first launch\n")

    damaged = root / "damaged_run"  # every checkpoint is garbage (one good one is resumed)
    shutil.copytree(run, damaged)
    for ckpt in (damaged / "checkpoints").glob("ckpt_*.pt"):
        ckpt.write_bytes(b"\x00not a checkpoint" * 100)

    (root / "a_file").write_text("not a folder\n")
    (root / "empty_run").mkdir()

    corrupt = root / "cifar_corrupt" / "cifar-10-batches-py"  # a truncated pickle
    corrupt.mkdir(parents=True)
    blob = pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))})
    (corrupt / "data_batch_1").write_bytes(blob[: len(blob) // 2])

    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n_classes in (("images3", 3), ("images_bad", 2)):
        for split, per_class in (("train", 6), ("test", 2)):
            for c in range(n_classes):
                folder = root / name / split / f"class{c}"
                folder.mkdir(parents=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "images_bad" / "train" / "class1" / "notes.txt").write_text("not an image\n")
    return root


def _imagefolder(root: str, n: int) -> list[str]:
    return ["dataset=imagefolder", f"dataset.root={root}", f"dataset.n1={n}",
            f"dataset.m1={n}", "dataset.gamma_l=1", "dataset.gamma_u=1"]


# (id, arguments after "imbssl", words the message must contain); {run}, {root} are filled in.
# "R" = resume the finished run folder with this override (so the override, not the folder,
# is what is wrong).
CASES = [
    ("unknown_dataset_option", ["R", "dataset=nosuch"], ["unknown dataset 'nosuch'"]),
    ("unknown_dataset_name", ["R", "dataset.name=nosuch"], ["unknown dataset 'nosuch'"]),
    ("unknown_algorithm_option", ["R", "algorithm=nosuch"], ["unknown algorithm 'nosuch'",
                                                             "fixmatch"]),
    ("unknown_algorithm_name", ["R", "algorithm.name=nosuch"], ["unknown algorithm 'nosuch'"]),
    ("unknown_model", ["R", "model.name=resnet9000"], ["unknown model 'resnet9000'"]),
    ("unknown_refiner", ["R", "pseudo.name=nosuch"], ["refiner 'nosuch'"]),
    ("misspelled_key", ["R", "trainer.iterationz=3"], ["trainer.iterationz"]),
    ("added_unknown_key", ["R", "+trainer.iterationz=3"], ["trainer.iterationz"]),
    ("wrong_type_int", ["R", "trainer.iterations=many"], ["trainer.iterations='many'"]),
    ("wrong_type_bool", ["R", "trainer.progress=maybe"], ["trainer.progress='maybe'"]),
    ("wrong_type_float", ["R", "dataset.gamma_l=steep"], ["dataset.gamma_l='steep'"]),
    ("override_syntax", ["R", "trainer.iterations"], ["trainer.iterations", "key=value"]),
    ("gamma_below_one", ["R", "dataset.gamma_l=0.5"], ["dataset.gamma_l=0.5", ">= 1"]),
    ("negative_temperature", ["R", "pseudo.proto_temperature=-0.1"],
     ["pseudo.proto_temperature=-0.1", "> 0"]),
    ("zero_temperature", ["R", "algorithm=simmatch", "algorithm.temperature=0"],
     ["algorithm.temperature=0", "> 0"]),
    ("zero_dist_temperature", ["R", "pseudo.dist_temperature=0"],
     ["pseudo.dist_temperature=0"]),
    ("threshold_above_one", ["R", "algorithm.threshold=1.5"],
     ["algorithm.threshold=1.5", "(0, 1]"]),
    ("threshold_zero", ["R", "algorithm.threshold=0"], ["algorithm.threshold=0", "(0, 1]"]),
    ("negative_weight", ["R", "algorithm.lambda_u=-1"], ["algorithm.lambda_u=-1"]),
    ("uratio_zero", ["R", "algorithm.uratio=0"], ["algorithm.uratio=0", ">= 1"]),
    ("bad_dist_align", ["R", "algorithm.dist_align=sometimes"],
     ["algorithm.dist_align='sometimes'", "uniform"]),
    ("zero_window", ["R", "pseudo.dist_window=0"], ["pseudo.dist_window=0"]),
    ("ema_decay", ["R", "model.ema_decay=1.5"], ["model.ema_decay=1.5"]),
    ("bad_norm", ["R", "model.norm=layer"], ["model.norm='layer'"]),
    ("negative_lr", ["R", "optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    ("zero_batch", ["R", "trainer.batch_size=0"], ["trainer.batch_size=0"]),
    ("bad_precision", ["R", "trainer.precision=fp8"], ["trainer.precision='fp8'"]),
    ("negative_seed", ["R", "seed=-1"], ["seed=-1"]),
    ("n1_too_large", ["R", "dataset.n1=1000"], ["class 0", "1000 labeled"]),
    ("m1_too_large", ["R", "dataset.m1=1000"], ["class 0", "1000 unlabeled"]),
    ("missing_dataset", ["R", "dataset=cifar10_lt", "dataset.root={root}/nothing_here"],
     ["CIFAR-10 not found", "nothing_here"]),
    ("corrupted_dataset", ["R", "dataset=cifar10_lt", "dataset.root={root}/cifar_corrupt"],
     ["data_batch_1", "corrupted"]),
    ("non_image_file", ["R", *_imagefolder("{root}/images_bad", 2)],
     ["notes.txt", "not a readable image"]),
    ("checkpoint_other_classes", ["R", *_imagefolder("{root}/images3", 2)],
     ["config differs", "dataset.name: 'digits' -> 'imagefolder'"]),
    # resume refuses another config before it reads the checkpoint (issue 32, item 2)
    ("checkpoint_other_model", ["R", "model=wrn28_2"],
     ["config differs", "model.name: 'small_cnn' -> 'wrn28_2'"]),
    ("checkpoint_other_algorithm", ["R", "algorithm=simmatch"],
     ["algorithm.name: 'fixmatch' -> 'simmatch'"]),
    ("checkpoint_other_norm", ["R", "model.norm=group"], ["model.norm: 'batch' -> 'group'"]),
    ("damaged_checkpoint", ["train", "run_dir={root}/damaged_run", "resume=true", *TINY],
     ["no checkpoint", "is usable", "ckpt_00000002.pt", "nothing was deleted"]),
    ("run_dir_is_a_file", ["train", "run_dir={root}/a_file", *TINY], ["not a folder"]),
    ("resume_without_checkpoint", ["train", "run_dir={root}/empty_run", "resume=true", *TINY],
     ["holds no checkpoint"]),
    ("second_run_same_folder", ["train", "run_dir={run}", *TINY], ["already holds a run"]),
    ("resume_and_overwrite", ["R", "overwrite=true"], ["resume=true and overwrite=true"]),
    ("past_iterations", ["R", "trainer.iterations=2"], ["step 4", "trainer.iterations=2"]),
    ("unknown_command", ["trian"], ["unknown command 'trian'"]),
    ("eval_missing_checkpoint", ["eval", "ckpt={root}/nothing.pt"], ["nothing.pt"]),
    ("eval_without_checkpoint", ["eval"], ["ckpt=PATH"]),
]
if not torch.cuda.is_available():
    CASES.append(("no_cuda", ["R", "device=cuda"], ["device=cuda", "device=cpu"]))


def _runs_digest(rel, world) -> dict:
    """Hashes of every run folder (and file) the cases point at; datasets are left out (the
    image-folder reader caches decoded images beside them by design)."""
    return {name: rel.folder_digest(world / name) if (world / name).is_dir()
            else (world / name).read_bytes() for name in ("run", "damaged_run", "a_file",
                                                           "empty_run")}


def _args(spec: list[str], world) -> list[str]:
    run, root = world / "run", world
    if spec and spec[0] == "R":
        spec = ["train", f"run_dir={run}", "resume=true", *TINY, *spec[1:]]
    return [a.format(run=run, root=root) for a in spec]


@pytest.mark.parametrize(("args", "words"), [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_bad_input_is_one_line_and_exit_2(world, rel, capsys, args, words):
    from hydra.core.global_hydra import GlobalHydra

    before = _runs_digest(rel, world)
    GlobalHydra.instance().clear()
    code = main(_args(args, world))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("imbssl: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word.format(root=world) in lines[0], lines[0]
    assert _runs_digest(rel, world) == before  # no run folder changed


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.slow  # subprocess / multi-process training: `pytest -m slow`
def test_real_processes(world, rel):
    """A few cases as real processes: the exit status and the whole of stderr."""
    import subprocess

    before = _runs_digest(rel, world)
    picked = {"wrong_type_int", "checkpoint_other_model"}
    procs = {}
    for case_id, args, words in CASES:
        if case_id in picked:
            procs[case_id] = (subprocess.Popen(
                [sys.executable, "-m", "imbssl", *_args(args, world)], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=rel.ENV), words)
    for case_id, (proc, words) in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (case_id, err)
        assert len(lines) == 1 and "Traceback" not in err, (case_id, err)
        assert all(w in lines[0] for w in words), (case_id, lines[0])
    assert _runs_digest(rel, world) == before


def test_debug_shows_the_traceback(world, capsys):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    from imbssl.errors import UserError

    with pytest.raises(UserError, match="algorithm.threshold"):
        main(["--debug", *_args(["R", "algorithm.threshold=2"], world)])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permissions do not bind root")
def test_unreadable_run_folder(world, capsys):
    from hydra.core.global_hydra import GlobalHydra

    locked = world / "locked_run"
    locked.mkdir(exist_ok=True)
    locked.chmod(0)
    try:
        GlobalHydra.instance().clear()
        code = main(["train", f"run_dir={locked}", "resume=true", *TINY])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not readable" in err[0], err
