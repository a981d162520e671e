"""STL-10 views in the official DASO order (issue 21): flip and crop (pad 4) at the native
96 px; the FixMatch family's RandAugment and CutoutAbs(16) at 96 px, then Resize(32)
(``ra_first=True``); ReMixMatch's RandAugment and Cutout after the resize (``ra_first=False``)
(official ``lib/dataset/transform/transforms.py`` and ``build.py``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imbssl.data import DatasetConfig, build_data
from imbssl.data.augment import CUTOUT_FILL, Augmenter, resize

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
N = 200


def stl_augmenter(**kw) -> Augmenter:
    """The STL-10 augmenter: 96 px images, 32 px views."""
    return Augmenter(MEAN, STD, size=32, **kw)


def cutout_only(view: str) -> torch.Tensor:
    """uint8 views of N black 96 px images with RandAugment off: only Cutout's gray is left."""
    aug = stl_augmenter(randaug_n=0, flip=False)
    x = torch.zeros(N, 3, 96, 96, dtype=torch.uint8)
    return aug.to_u8(aug.view(view, x, torch.Generator().manual_seed(0)))


def test_fixmatch_family_cutout_is_16_of_96_px():
    out = cutout_only("strong").float()
    assert out.shape == (N, 3, 32, 32)
    # Cutout's share of each 32 px output: its gray mass over a full gray image's
    fraction = out.sum(dim=(1, 2, 3)) / (CUTOUT_FILL * out[0].numel())
    official = (16 / 96) ** 2  # CutoutAbs(img, 16) at 96 px, ~2.8% of the area
    # most squares are not clipped by the border (p = (88/96)^2): those cover it exactly
    assert float(fraction.median()) == pytest.approx(official, rel=0.03)
    assert float(fraction.max()) == pytest.approx(official, rel=0.03)
    assert float(fraction.min()) > 0.25 * official  # every image has its Cutout


def test_remixmatch_cutout_is_16_of_32_px():
    out = cutout_only("strong_after_resize")
    assert out.shape == (N, 3, 32, 32)
    gray = (out == int(CUTOUT_FILL)).all(dim=1).sum(dim=(1, 2))
    assert set(torch.unique(out).tolist()) == {0, int(CUTOUT_FILL)}  # no resize after it
    assert int(gray.max()) == 16 * 16 and float(gray.float().median()) == 16 * 16  # (16/32)^2
    assert int(gray.min()) >= 8 * 8  # clipped by the border at most to the half side


def ramps() -> torch.Tensor:
    """N copies of a 96 px image whose channel 0 is 2 * column and channel 1 is 2 * row."""
    r = torch.arange(96) * 2
    img = torch.stack([r.view(1, 96).expand(96, 96), r.view(96, 1).expand(96, 96),
                       torch.zeros(96, 96, dtype=torch.int64)])
    return img.to(torch.uint8).expand(N, 3, 96, 96).contiguous()


@pytest.mark.parametrize("view", ["weak", "strong_after_resize"])
def test_weak_crop_shift_is_4_px_at_96(view):
    aug = stl_augmenter(flip=False, randaug_n=0, cutout=0.0)
    x = ramps()
    out = aug.to_u8(aug.view(view, x, torch.Generator().manual_seed(1))).float()
    ref = resize(x, 32).float()
    inner = (slice(None), slice(4, 28), slice(4, 28))  # away from the reflected border
    # shift of the content in 96 px units: ramp difference / 2 (the ramp's slope)
    dx = ((out[:, 0] - ref[:, 0])[inner].mean(dim=(1, 2)) / 2).round()
    dy = ((out[:, 1] - ref[:, 1])[inner].mean(dim=(1, 2)) / 2).round()
    for d in (dx, dy):
        assert set(d.tolist()) == set(range(-4, 5))  # official RandomCrop(96, padding=4)


def test_pad_and_cutout_side_in_output_pixels():
    aug = stl_augmenter()
    assert (aug.pad(96), aug.cutout_side(96), aug.out_size(96)) == (4, 16, 32)
    cifar = Augmenter(MEAN, STD)
    assert (cifar.pad(32), cifar.cutout_side(32), cifar.out_size(32)) == (4, 16, 32)


def test_views_have_the_output_size():
    aug = stl_augmenter()
    x = torch.randint(0, 256, (5, 3, 96, 96), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    for view in ("weak", "strong", "strong_after_resize", "none"):
        assert aug.view(view, x, gen).shape == (5, 3, 32, 32), view
    assert torch.equal(aug.to_u8(aug.view("none", x)), resize(x, 32))


def test_without_resize_both_strong_orders_are_the_same():
    """CIFAR (no resize): "strong_after_resize" is bit-identical to "strong" for a seed."""
    aug = Augmenter(MEAN, STD)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(2),
                      dtype=torch.uint8)
    a = aug.strong_u8(x, torch.Generator().manual_seed(3))
    b = aug.strong_u8(x, torch.Generator().manual_seed(3), before_resize=False)
    assert torch.equal(a, b)
    assert torch.equal(aug.view("strong_after_resize", x, torch.Generator().manual_seed(4)),
                       aug.view("strong", x, torch.Generator().manual_seed(4)))


def test_strong_orders_differ_with_resize():
    aug = stl_augmenter()
    x = torch.randint(0, 256, (8, 3, 96, 96), generator=torch.Generator().manual_seed(5),
                      dtype=torch.uint8)
    a = aug.strong_u8(x, torch.Generator().manual_seed(6))
    b = aug.strong_u8(x, torch.Generator().manual_seed(6), before_resize=False)
    assert a.shape == b.shape == (8, 3, 32, 32) and not torch.equal(a, b)


# ----------------------------------------------------------------------------- build_data

class FakeSTL10:
    """torchvision.datasets.STL10 stand-in with 12x12 CHW images."""

    sizes = {"train": 50, "test": 20, "unlabeled": 30}

    def __init__(self, root, split="train", download=False):
        n = self.sizes[split]
        rng = np.random.default_rng(len(split))
        self.data = rng.integers(0, 256, (n, 3, 12, 12), dtype=np.uint8)
        self.labels = np.full(n, -1) if split == "unlabeled" else np.arange(n) % 10
        self.classes = [f"c{i}" for i in range(10)]


@pytest.fixture
def fake_stl10(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "STL10", FakeSTL10)
    (tmp_path / "stl10_binary").mkdir()
    return tmp_path


def test_build_data_keeps_train_images_native(fake_stl10):
    cfg = DatasetConfig(name="stl10", root=str(fake_stl10), n1=4, gamma_l=4, flip=True,
                        num_valid_per_class=1, image_size=4, resize_views=True)
    data = build_data(cfg, "cpu")
    assert data.labeled.images.shape[2:] == data.unlabeled.images.shape[2:] == (12, 12)
    assert data.test.images.shape[2:] == data.valid.images.shape[2:] == (4, 4)
    assert data.image_shape == (3, 4, 4) and data.augmenter.size == 4
    test = torch.from_numpy(FakeSTL10(None, "test").data)
    assert torch.equal(data.test.images, resize(test, 4))  # eval: Resize only, as official
    gen = torch.Generator().manual_seed(0)
    assert data.augmenter.weak(data.labeled.images, gen).shape[2:] == (4, 4)


def test_build_data_without_resize_views_resizes_at_load(fake_stl10):
    cfg = DatasetConfig(name="stl10", root=str(fake_stl10), n1=4, gamma_l=4, image_size=4)
    data = build_data(cfg, "cpu")
    assert data.labeled.images.shape[2:] == data.unlabeled.images.shape[2:] == (4, 4)
    assert data.augmenter.size == 0 and data.image_shape == (3, 4, 4)


def test_only_stl10_config_resizes_views():
    from omegaconf import OmegaConf

    from .test_sources import REPO

    for path in sorted((REPO / "configs" / "dataset").glob("*.yaml")):
        raw = OmegaConf.load(path)
        assert raw.resize_views is (path.stem == "stl10"), path.name


@pytest.mark.parametrize("algorithm", ["fixmatch", "remixmatch"])
def test_trainer_sees_views_of_the_output_size(tiny_cfg, fake_stl10, algorithm):
    """A few training steps on the fake STL-10 (12 px stored, 4 px views): every batch the
    model sees has the views' size, and ReMixMatch asks for the after-resize strong views."""
    from imbssl.engine.trainer import Trainer

    cfg = tiny_cfg("dataset=stl10", f"dataset.root={fake_stl10}", "dataset.n1=4",
                   "dataset.gamma_l=4", "dataset.image_size=4", "model=small_cnn",
                   f"algorithm={algorithm}", "pseudo=none", "trainer.report=false")
    trainer = Trainer(cfg)
    sizes = set()
    trainer.model.register_forward_pre_hook(lambda m, args: sizes.add(args[0].shape[1:]))
    trainer.run()
    assert sizes == {(3, 4, 4)}
    strong = {"fixmatch": "strong", "remixmatch": "strong_after_resize"}[algorithm]
    assert trainer.algo.unlabeled_views[1] == strong
