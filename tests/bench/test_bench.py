"""`imbssl bench` smoke test (tiny CPU run, no timing asserts) and the PIL pipeline pieces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imbssl.bench import throughput as bench
from imbssl.bench.conventional import PIL_OPS, PILDataset, PILRandAugment, PILViews, to_pil
from imbssl.errors import UserError

RATE_KEYS = {"its_per_s", "images_per_s", "ms_per_it", "peak_mem_mb", "minutes_250k", "mfu",
             "its_per_s_mean", "its_per_s_min", "its_per_s_max", "timed_iters", "seconds"}


def test_bench_smoke_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--dataset", "digits_lt", "--model", "small_cnn",
                     "--algorithms", "fixmatch+daso", "--batch-size", "8", "--uratio", "1",
                     "--iters", "2", "--warmup", "1", "--workers", "1", "--device", "cpu",
                     "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert bench.TABLE_HEADER in printed
    assert "ours (device)" in printed and "DataLoader+PIL" in printed

    report = json.loads(out.read_text())
    assert report["settings"]["dataset"] == "digits_lt"
    (r,) = report["results"]
    assert r["algorithm"] == "fixmatch+daso" and r["batch_size"] == 8 and r["uratio"] == 1
    assert r["device"] == "cpu" and r["peak_tflops"] is None
    images = r["images_per_step"]
    assert images["labeled"] == 8 and images["unlabeled"] == 16 and images["total"] == 24
    assert images["no_grad"] == 8  # DASO's EMA forward of the labeled batch
    for pipeline in ("ours", "conventional"):
        m = r[pipeline]
        assert RATE_KEYS <= set(m), pipeline
        for key in ("its_per_s", "images_per_s", "ms_per_it", "minutes_250k", "seconds"):
            assert m[key] > 0, (pipeline, key)
        assert m["peak_mem_mb"] >= 0
        assert m["mfu"] is None  # no peak FLOP/s on CPU unless --peak-tflops
        assert m["images_per_s"] == pytest.approx(m["its_per_s"] * 24)
    assert r["speedup"] == pytest.approx(r["ours"]["its_per_s"] / r["conventional"]["its_per_s"])
    flops = r["flops"]
    assert flops["forward_per_image"] > 0 and flops["step_flops_approx"] > 0
    assert flops["step_flops_counted"] > 0
    assert flops["step_flops_used"] == flops["step_flops_counted"]


def test_bench_mfu_with_peak_and_no_conventional(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--dataset", "digits_lt", "--model", "small_cnn", "--algorithms",
                       "fixmatch", "--batch-size", "4", "--quick", "--no-conventional",
                       "--device", "cpu", "--peak-tflops", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert "conventional" not in r and "speedup" not in r
    assert 0 < r["ours"]["mfu"] < 1
    assert r["images_per_step"]["no_grad"] == 0


@pytest.mark.parametrize("text", ["fixmatch+crest", "+daso", "a+b+c"])
def test_bad_algorithm_spec(text):
    with pytest.raises(UserError):
        bench.parse_spec(text)


def test_spec_parsing():
    assert bench.parse_spec("remixmatch+daso") == bench.Spec("remixmatch+daso", "remixmatch",
                                                              "daso")
    assert bench.parse_spec("mixmatch").pseudo == "none"


def test_cli_dispatches_bench(capsys):
    from imbssl.cli import main

    assert main(["bench", "--algorithms", "fixmatch+nope"]) == 2
    assert "fixmatch+nope" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pil_ops_keep_size_and_mode(mode):
    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if mode == "RGB" else (8, 8, 1)
    img = to_pil(rng.integers(0, 256, shape, dtype=np.uint8))
    assert img.mode == mode
    for name, op in PIL_OPS.items():
        for level in (1, 9):
            out = op(img, level)
            assert out.size == img.size and out.mode == mode, name
    out = PILRandAugment()(img)
    assert out.size == img.size and out.mode == mode


def test_pil_views_shapes_and_normalization():
    views = PILViews((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), flip=True)
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    none = views("none", img)
    assert none.shape == (3, 32, 32) and none.dtype == torch.float32
    assert torch.allclose(none, torch.full_like(none, (128 / 255 - 0.5) / 0.25), atol=1e-6)
    for name in ("weak", "strong"):
        assert views(name, img).shape == (3, 32, 32)


def test_pil_dataset_items():
    images = np.zeros((5, 8, 8, 1), dtype=np.uint8)
    ds = PILDataset(images, np.arange(5), ("weak", "strong"), PILViews((0.5,), (0.5,), False))
    weak, strong, label, idx = ds[3]
    assert weak.shape == strong.shape == (1, 8, 8) and (label, idx) == (3, 3)
