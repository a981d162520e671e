"""Data and file faults read wrongly or ending in a traceback (issue 32 items 5, 6, 7 and 9):
each is now read right or refused with one line on stderr and exit code 2.

* 5: 16-bit PNGs are scaled by their bit depth, not clipped to 255.
* 6: CIFAR class names and labels are checked against each other and the class count.
* 7: a CIFAR pickle that declares a larger array than the file holds is refused before the
  array is allocated.
* 9: decompression-bomb headers, 1x1 images, dataset.image_size 1 or 30000, a 300-character
  run_dir name, ``imbssl eval model=...`` on another model's checkpoint, CIFAR data or
  labels holding strings or out-of-range values, checkpoints with missing or mistyped
  entries, ``imbssl report`` on a damaged metrics.jsonl or a YAML-tagged config.yaml.
"""
from __future__ import annotations

import io
import pickle
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from imbssl.cli import main
from imbssl.data import DataError, load_source

TINY = ["trainer.iterations=4", "trainer.batch_size=8", "trainer.eval_interval=2",
        "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.report=false", "device=cpu"]
CKPT = "checkpoints/ckpt_00000004.pt"


# ----------------------------------------------------------------------------- file writers
def png_bytes(pixels: np.ndarray, color_type: int, width: int | None = None,
              height: int | None = None) -> bytes:
    """A 16-bit PNG of ``pixels`` (H, W, C) uint16; color type 0 gray, 2 RGB, 6 RGBA.
    ``width``/``height`` override the header only (a crafted header)."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width or w, height or h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def image_folder(root: Path, size: int, classes: int = 3, per_class: int = 6) -> Path:
    """root/{train,test}/c<k>/<i>.png with random 8-bit RGB images of size x size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    return root


NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10(root: Path, batch1: dict | None = None, test: dict | None = None,
            meta: dict | None = None) -> Path:
    """A 2-images-per-class CIFAR-10 copy in the official layout; the dicts replace entries of
    data_batch_1, test_batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 2)
    for b, idx in enumerate(np.array_split(np.arange(20), 5)):
        entry = {"labels": labels[idx].tolist(),
                 "data": rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8)}
        entry.update(batch1 if b == 0 and batch1 else {})
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry, protocol=2))
    entry = {"labels": list(range(10)), "data": rng.integers(0, 256, (10, 3072), dtype=np.uint8)}
    entry.update(test or {})
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": NAMES, **(meta or {})},
                                                       protocol=2))
    return root


class _Declared:
    """Pickles as a call that builds an array of ``shape`` without its data."""

    def __init__(self, shape: tuple[int, ...], dtype: str, via_reconstruct: bool = False):
        self.shape, self.dtype, self.via_reconstruct = shape, dtype, via_reconstruct

    def __reduce__(self):
        if self.via_reconstruct:  # numpy's own reconstruction, with a huge shape and no state
            return np.ndarray((0,)).__reduce__()[0], (np.ndarray, self.shape, b"b")
        return np.ndarray, (self.shape, self.dtype)


def crafted_batch(via_reconstruct: bool) -> bytes:
    """A data_batch of a few hundred bytes declaring 300,000 images of 3072 bytes."""
    return pickle.dumps({"data": _Declared((300000, 3072), "u1", via_reconstruct),
                         "labels": _Declared((300000,), "i8", via_reconstruct)}, protocol=2)


# ----------------------------------------------------------------------------- world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.checkpoint import CHECKSUM_KEY, payload_checksum
    from imbssl.engine.trainer import Trainer

    root = tmp_path_factory.mktemp("input_faults")
    run = root / "run"
    Trainer(compose([*TINY, f"run_dir={run}"])).run()
    GlobalHydra.instance().clear()

    def damaged_checkpoint(name: str, change) -> None:
        folder = root / name
        shutil.copytree(run, folder)
        state = torch.load(folder / CKPT, weights_only=True)
        state.pop(CHECKSUM_KEY)
        change(state)
        torch.save({**state, CHECKSUM_KEY: payload_checksum(state)}, folder / CKPT)

    damaged_checkpoint("ckpt_no_ema", lambda s: s.pop("ema"))
    damaged_checkpoint("ckpt_step_text", lambda s: s.update(step="four"))
    damaged_checkpoint("ckpt_classes_text", lambda s: s.update(num_classes="ten"))
    damaged_checkpoint("ckpt_ema_text", lambda s: s.update(ema="weights"))
    damaged_checkpoint("ckpt_algorithm_list", lambda s: s.update(algorithm=[1, 2]))
    damaged_checkpoint("ckpt_ema_foreign", lambda s: s.update(ema={"model": {"w": torch.ones(2)}}))

    for name in ("metrics_text_step", "metrics_text_value", "config_tagged"):
        shutil.copytree(run, root / name)
    with open(root / "metrics_text_step" / "metrics.jsonl", "a") as f:
        f.write('{"step": "six", "split": "test", "top1": 0.5}\n')
    with open(root / "metrics_text_value" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "test", "top1": "high"}\n')
    marker = root / "tag_ran"
    (root / "config_tagged" / "config.yaml").write_text(
        f'dataset: !!python/object/apply:os.system ["touch {marker}"]\n')

    image_folder(root / "images_1x1", 1)
    bomb = image_folder(root / "images_bomb", 8)
    (bomb / "train" / "c1" / "2.png").write_bytes(
        png_bytes(np.zeros((1, 1, 1), np.uint16), 0, width=20000, height=20000))

    cifar10(root / "cifar_data_text", batch1={"data": [["x"] * 3072] * 4})
    cifar10(root / "cifar_labels_text", batch1={"labels": ["0", "1", "2", "3"]})
    cifar10(root / "cifar_pixel_300", batch1={"data": np.full((4, 3072), 300, np.int64)})
    cifar10(root / "cifar_train_label_12", batch1={"labels": [0, 12, 2, 3]})
    cifar10(root / "cifar_test_label_minus1", test={"labels": [-1] + list(range(1, 10))})
    cifar10(root / "cifar_nine_names", meta={"label_names": NAMES[:9]})
    crafted = cifar10(root / "cifar_crafted")
    (crafted / "cifar-10-batches-py" / "data_batch_1").write_bytes(crafted_batch(False))
    return root


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines()


def _imagefolder(root: str) -> list[str]:
    return ["dataset=imagefolder", f"dataset.root={root}", "dataset.n1=4", "dataset.m1=2",
            "dataset.gamma_l=1", "dataset.gamma_u=1"]


def _cifar(root: str) -> list[str]:
    return ["dataset=cifar10_lt", f"dataset.root={root}"]


LONG_NAME = "r" * 300
# (id, arguments after "imbssl", words the one line must contain); {root}: the world folder
CASES = [
    # item 9: data and config values
    ("png_bomb", ["train", "run_dir={root}/new", *TINY, *_imagefolder("{root}/images_bomb")],
     ["2.png", "too large to decode"]),
    ("images_1x1", ["train", "run_dir={root}/new", *TINY, *_imagefolder("{root}/images_1x1")],
     ["1x1 pixels", "dataset.image_size"]),
    ("image_size_1", ["train", "run_dir={root}/new", *TINY, "dataset.image_size=1"],
     ["dataset.image_size=1", "[4, 1024]"]),
    ("image_size_30000", ["train", "run_dir={root}/new", *TINY, "dataset.image_size=30000"],
     ["dataset.image_size=30000"]),
    ("run_dir_300_chars", ["train", f"run_dir={{root}}/{LONG_NAME}", *TINY],
     ["run_dir=", "255 bytes", "one has 300"]),
    # item 9: imbssl eval
    ("eval_other_model", ["eval", f"ckpt={{root}}/run/{CKPT}", "model=wrn28_2"],
     ["model=wrn28_2", "model=small_cnn"]),
    ("eval_no_ema", ["eval", f"ckpt={{root}}/ckpt_no_ema/{CKPT}"], ["not a usable imbssl checkpoint", "'ema' is missing"]),
    ("eval_step_text", ["eval", f"ckpt={{root}}/ckpt_step_text/{CKPT}"],
     ["not a usable imbssl checkpoint", "step 'four' is not a step number"]),
    ("eval_classes_text", ["eval", f"ckpt={{root}}/ckpt_classes_text/{CKPT}"],
     ["not a usable imbssl checkpoint", "'num_classes' is str, not int"]),
    ("eval_ema_text", ["eval", f"ckpt={{root}}/ckpt_ema_text/{CKPT}"],
     ["not a usable imbssl checkpoint", "'ema' is str, not dict"]),
    ("eval_algorithm_list", ["eval", f"ckpt={{root}}/ckpt_algorithm_list/{CKPT}"],
     ["not a usable imbssl checkpoint", "'algorithm' is list, not dict"]),
    ("eval_ema_foreign", ["eval", f"ckpt={{root}}/ckpt_ema_foreign/{CKPT}"],
     ["EMA model does not fit"]),
    # item 9: imbssl report
    ("report_metrics_text_step", ["report", "{root}/metrics_text_step", "--out", "{root}/o1"],
     ["metrics.jsonl line", "step 'six'"]),
    ("report_metrics_text_value", ["report", "{root}/metrics_text_value", "--out", "{root}/o2"],
     ["metrics.jsonl line", "'top1' is 'high'"]),
    ("report_config_tagged", ["report", "{root}/config_tagged", "--out", "{root}/o3"],
     ["config.yaml cannot be read as plain YAML", "python/object"]),
    # items 6 and 9: CIFAR contents
    ("cifar_data_text", ["train", "run_dir={root}/new", *TINY, *_cifar("{root}/cifar_data_text")],
     ["data_batch_1", "'data' must hold integers"]),
    ("cifar_labels_text", ["train", "run_dir={root}/new", *TINY,
                           *_cifar("{root}/cifar_labels_text")],
     ["data_batch_1", "'labels' must hold integers"]),
    ("cifar_pixel_300", ["train", "run_dir={root}/new", *TINY, *_cifar("{root}/cifar_pixel_300")],
     ["data_batch_1", "pixel values outside [0, 255]", "300"]),
    ("cifar_train_label_12", ["train", "run_dir={root}/new", *TINY,
                              *_cifar("{root}/cifar_train_label_12")],
     ["data_batch_1", "class labels outside [0, 9]", "12"]),
    ("cifar_test_label_minus1", ["train", "run_dir={root}/new", *TINY,
                                 *_cifar("{root}/cifar_test_label_minus1")],
     ["test_batch", "class labels outside [0, 9]", "-1"]),
    ("cifar_nine_names", ["train", "run_dir={root}/new", *TINY,
                          *_cifar("{root}/cifar_nine_names")],
     ["batches.meta", "9 class names", "10 classes"]),
    # item 7
    ("cifar_crafted_size", ["train", "run_dir={root}/new", *TINY, *_cifar("{root}/cifar_crafted")],
     ["data_batch_1", "declares an array of shape (300000, 3072)", "refused before allocating"]),
]


@pytest.mark.parametrize(("args", "words"), [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_fault_is_one_line_and_exit_2(world, capsys, args, words):
    code, lines = run_cli([a.format(root=world) for a in args], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("imbssl: error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    assert not (world / "new").exists()  # refused before the run folder was made
    assert not (world / "tag_ran").exists()  # the YAML tag was never run


def test_eval_still_takes_the_checkpoints_own_choice_and_single_keys(world, capsys):
    code = main(["eval", f"ckpt={world}/run/{CKPT}", "model=small_cnn", "device=cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and "checkpoint step 4" in out, err


# ----------------------------------------------------------------------------- item 5
@pytest.mark.parametrize(("color_type", "channels"), [(0, 1), (2, 3), (6, 4)])
def test_16bit_pngs_are_scaled_by_bit_depth_not_clipped(tmp_path, color_type, channels):
    """Three classes of constant 16-bit images: three distinct gray levels (v >> 8), not
    three copies of 255 (16-bit grayscale) as before."""
    levels = {0: 9000, 1: 30000, 2: 65535}
    for split in ("train", "test"):
        for c, level in levels.items():
            folder = tmp_path / split / f"c{c}"
            folder.mkdir(parents=True)
            pixels = np.full((8, 8, channels), level, np.uint16)
            (folder / "0.png").write_bytes(png_bytes(pixels, color_type))
    src = load_source("imagefolder", tmp_path)
    for c, level in levels.items():
        img = src.train_images[src.train_labels == c]
        assert img.shape == (1, 8, 8, 3)
        assert (img == level >> 8).all(), (c, np.unique(img))


def test_16bit_cache_of_the_old_decoder_is_not_reused(tmp_path):
    """The image-folder cache fingerprint names the decoder version, so images cached
    clipped by an older imbssl are decoded again."""
    from imbssl.data import sources

    image_folder(tmp_path, 8)
    files = {s: sources._list_split(tmp_path, s, ["c0", "c1", "c2"]) for s in ("train", "test")}
    now = sources._fingerprint(tmp_path, files)
    old, sources.DECODER_VERSION = sources.DECODER_VERSION, 1
    try:
        assert sources._fingerprint(tmp_path, files) != now
    finally:
        sources.DECODER_VERSION = old


# ----------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("via_reconstruct", [False, True], ids=["ndarray", "_reconstruct"])
def test_declared_array_is_checked_against_the_file_before_allocating(tmp_path, via_reconstruct):
    root = cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(crafted_batch(via_reconstruct))
    assert path.stat().st_size < 400
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"data_batch_1 .*declares .*300000.*refused before "
                                            r"allocating"):
            load_source("cifar10", root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB allocated"


def test_real_cifar_pickles_still_load(tmp_path):
    """Arrays pickled by numpy's own reduce (the official files) pass the size check."""
    root = cifar10(tmp_path)
    src = load_source("cifar10", root)
    assert src.train_images.shape == (20, 32, 32, 3) and src.num_classes == 10
    buf = io.BytesIO()
    pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}, buf,
                protocol=5)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(buf.getvalue())
    assert len(load_source("cifar10", root).train_labels) == 20
