"""CTAugment: PIL parity of every op, the sampler's threshold, the weight update on a
hand-computed case, per-image randomness and the glue with FixMatch / ReMixMatch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imbssl.data import ctaugment as C
from imbssl.data.augment import Augmenter
from imbssl.errors import UserError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def rand_images(n=4, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def pil_apply(x, fn):
    """Apply a PIL function image by image (reference only)."""
    from PIL import Image

    imgs = [np.asarray(fn(Image.fromarray(i.permute(1, 2, 0).numpy()))) for i in x]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)


def official(name, v, fill, width):
    """The official CTAugment op (google-research/fixmatch libml/ctaugment.py) at v with PIL,
    written out here; Translate in pixels of the paper's +-30% range; fill given."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    fc = (fill,) * 3

    def enhance(op):
        return lambda im: op(im).enhance(0.1 + 1.9 * v)

    def blend(op):
        return lambda im: Image.blend(im, op(im), v)

    def affine(*coeffs):
        return lambda im: im.transform(im.size, Image.AFFINE, coeffs, fillcolor=fc)

    s, t = (2 * v - 1) * 0.3, int((2 * v - 1) * 0.3 * width)
    return {
        "autocontrast": blend(ImageOps.autocontrast),
        "blur": blend(lambda im: im.filter(ImageFilter.BLUR)),
        "brightness": enhance(ImageEnhance.Brightness), "color": enhance(ImageEnhance.Color),
        "contrast": enhance(ImageEnhance.Contrast), "equalize": blend(ImageOps.equalize),
        "invert": blend(ImageOps.invert), "identity": lambda im: im,
        "posterize": lambda im: ImageOps.posterize(im, 1 + int(v * 7.999)),
        "rotate": lambda im: im.rotate(int(np.round((2 * v - 1) * 45)), fillcolor=fc),
        "sharpness": enhance(ImageEnhance.Sharpness),
        "shear_x": affine(1, s, 0, 0, 1, 0), "shear_y": affine(1, 0, 0, s, 1, 0),
        "smooth": blend(lambda im: im.filter(ImageFilter.SMOOTH)),
        "solarize": lambda im: ImageOps.solarize(im, int(v * 255.999)),
        "translate_x": affine(1, 0, t, 0, 1, 0), "translate_y": affine(1, 0, 0, 0, 1, t),
    }[name]


@pytest.mark.parametrize("fill", [0, 128])
@pytest.mark.parametrize("name", [n for n in C.CTA_OPS if n != "cutout"])
def test_each_op_matches_pil(name, fill):
    x = rand_images(seed=7)
    x[1] = x[1] // 3 + 60  # a low-contrast image
    for v in (0.0, 0.13, 0.37, 0.5, 0.71, 0.96):
        ours = C.apply_cta_ops(x, torch.full((4,), C.CTA_INDEX[name]), torch.full((4,), v), fill)
        assert ours.dtype == torch.uint8
        assert torch.equal(ours, pil_apply(x, official(name, v, fill, 16))), (name, v)


def test_cutout_op_region():
    """Official cutout: side 1 + int(v * 16 * 0.499), square [c - s//2, c + s//2) clipped."""
    x = torch.full((2, 1, 16, 16), 200, dtype=torch.uint8)
    v = torch.tensor([0.5, 0.9])  # sides 4 (half 2) and 8 (half 4)
    out = C.apply_cta_ops(x, torch.full((2,), C.CTA_INDEX["cutout"]), v,
                          cutout_centre=(torch.tensor([5, 1]), torch.tensor([8, 14])))
    gray = out[:, 0] == 127
    assert gray[0].nonzero().min(0).values.tolist() == [3, 6]
    assert gray[0].nonzero().max(0).values.tolist() == [6, 9] and int(gray[0].sum()) == 16
    assert gray[1].nonzero().min(0).values.tolist() == [0, 10]  # clipped at the top and right
    assert gray[1].nonzero().max(0).values.tolist() == [4, 15] and int(gray[1].sum()) == 30
    assert (out[:, 0][~gray] == 200).all()


def test_mixed_batch_has_no_crosstalk():
    n = len(C.CTA_OPS)
    x = rand_images(n=n, seed=5)
    op, v = torch.arange(n), torch.linspace(0.05, 0.95, n)
    centre = (torch.full((n,), 8), torch.full((n,), 8))
    out = C.apply_cta_ops(x, op, v, 0, centre)
    for i in range(n):
        one = C.apply_cta_ops(x[i:i + 1], op[i:i + 1], v[i:i + 1], 0,
                              (centre[0][i:i + 1], centre[1][i:i + 1]))
        assert torch.equal(out[i:i + 1], one), C.CTA_OPS[i]


# ----------------------------------------------------------------------------- sampler + update

def test_sampler_never_draws_a_bin_below_the_threshold():
    cta = C.CTAugment()
    g = torch.Generator().manual_seed(0)
    cta.weights.copy_(torch.rand(cta.weights.shape, generator=g))  # many bins far below 0.8
    probs = cta.bin_probs()
    rel = (cta.weights + 1 - C.DECAY) / torch.where(cta.valid, cta.weights + 1 - C.DECAY,
                                                    0).amax(1, keepdim=True)
    allowed = cta.valid & (rel >= C.THRESHOLD)
    assert torch.equal(probs > 0, allowed) and (~allowed).sum() > 100
    op, bins, v = cta.sample(20000, torch.Generator().manual_seed(1))
    assert allowed[op, bins].all()  # every draw is an allowed bin
    nb = cta.num_bins[op].float()
    assert ((v >= bins / nb) & (v < (bins + 1) / nb)).all()  # v inside its bin
    drawn = torch.zeros_like(allowed)
    drawn[op, bins] = True
    assert torch.equal(drawn, allowed)  # and every allowed bin is drawn at some point


def test_probe_policy_is_uniform_and_names_its_bin():
    cta = C.CTAugment()
    cta.weights.zero_()  # weights do not matter for probes
    op, bins, v = cta.sample(5000, torch.Generator().manual_seed(2), probe=True)
    assert torch.equal(bins, torch.floor(v * cta.num_bins[op] * 0.999).long())
    assert len(torch.unique(op)) == len(C.CTA_OPS) and float(v.min()) < 0.01


def test_update_follows_the_formula_on_a_hand_computed_case():
    cta = C.CTAugment()
    b, i, ident = C.CTA_INDEX["brightness"], C.CTA_INDEX["invert"], C.CTA_INDEX["identity"]
    op = torch.tensor([[b, b], [b, ident], [i, b]])
    bins = torch.tensor([[3, 3], [3, 0], [16, 4]])
    prox = torch.tensor([0.5, 0.2, 0.9])
    cta.update(op, bins, prox)
    w = cta.weights
    # brightness bin 3, hit three times in order with proximities 0.5, 0.5, 0.2:
    expected = 1.0
    for a in (0.5, 0.5, 0.2):
        expected = 0.99 * expected + 0.01 * a
    assert expected == pytest.approx(0.9821495, abs=1e-9)
    torch.testing.assert_close(w[b, 3], torch.tensor(expected))
    torch.testing.assert_close(w[i, 16], torch.tensor(0.99 + 0.01 * 0.9))
    torch.testing.assert_close(w[b, 4], torch.tensor(0.99 + 0.01 * 0.9))
    changed = torch.ones_like(w, dtype=torch.bool)
    changed[b, 3] = changed[i, 16] = changed[b, 4] = False
    assert (w[changed] == 1.0).all()  # nothing else moves, identity included
    assert float(w[ident, 0]) == 1.0


def test_proximity_hand_case():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(C.proximity(probs, torch.tensor([0, 0])),
                               torch.tensor([0.7, 0.0]))


# ----------------------------------------------------------------------------- views + probes

def test_strong_view_per_image_randomness_and_seeding():
    aug, cta = Augmenter(MEAN, STD), C.CTAugment()
    x = rand_images(n=1, h=32, w=32).expand(64, 3, 32, 32).contiguous()
    a = aug.view(cta.strong_view, x, torch.Generator().manual_seed(0))
    b = aug.view(cta.strong_view, x, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and a.shape == x.shape and torch.equal(a, b)
    u8 = aug.to_u8(a)
    assert len({bytes(s.numpy()) for s in u8}) == 64
    assert ((u8 == 127).all(dim=1).sum(dim=(1, 2)) > 0).all()  # the final Cutout square
    assert cta.augmenter is aug and cta.generator is not None


def test_to_u8_inverts_normalize():
    aug = Augmenter(MEAN, STD)
    x = rand_images(n=8, h=32, w=32, seed=3)
    assert torch.equal(aug.to_u8(aug.normalize(x)), x)


class Linear(torch.nn.Module):
    """A tiny classifier returning .logits, for probe tests."""

    def __init__(self, k=3):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, k)

    def forward(self, x):
        return type("Out", (), {"logits": self.fc(x.flatten(1))})()


def test_probe_step_updates_only_the_probed_bins():
    aug, cta = Augmenter(MEAN, STD), C.CTAugment()
    gen = torch.Generator().manual_seed(0)
    x = rand_images(n=8)
    aug.view(cta.strong_view, x, gen)  # attaches the augmenter and generator
    state = gen.get_state()
    y = torch.arange(8) % 3
    prox = cta.probe_step(Linear(), aug.normalize(x), y)
    assert 0.0 <= float(prox) <= 1.0
    gen.set_state(state)  # the same draws show which bins the probes used
    policy = cta.draw(8, (16, 16), gen, probe=True)
    hit = torch.zeros_like(cta.weights, dtype=torch.bool)
    keep = policy["op"] != C.CTA_INDEX["identity"]
    hit[policy["op"][keep], policy["bin"][keep]] = True
    assert (cta.weights[hit] < 1.0).all() and (cta.weights[~hit] == 1.0).all()


def test_probe_step_needs_a_strong_view_first():
    with pytest.raises(RuntimeError, match="strong_view"):
        C.CTAugment().probe_step(Linear(), torch.zeros(2, 3, 16, 16), torch.zeros(2).long())


# ----------------------------------------------------------------------------- algorithms

@pytest.mark.parametrize("name", ["fixmatch", "remixmatch"])
def test_algorithms_take_ctaugment(name):
    from imbssl.algorithms import get_algorithm

    cls = get_algorithm(name)
    algo = cls(cls.Config(strong_augment="ctaugment"), 3, 8, torch.arange(6) % 3)
    strong = [v for v in algo.unlabeled_views if v != "weak"]
    assert strong and all(v == algo.ctaugment.strong_view for v in strong)
    assert "ctaugment.weights" in algo.state_dict()
    plain = cls(cls.Config(), 3, 8, torch.arange(6) % 3)
    assert plain.ctaugment is None and plain.unlabeled_views == cls.unlabeled_views
    with pytest.raises(UserError, match="strong_augment"):
        cls(cls.Config(strong_augment="autoaugment"), 3, 8, torch.arange(6) % 3)
