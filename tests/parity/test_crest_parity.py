"""Parity with the official CReST code in DASO (github.com/ytaek-oh/daso,
lib/algorithm/fm_crest.py, lib/algorithm/base_algorithm.py and lib/models/dist_align.py at
commit 3541a6c452f895056f5fdac440b5d0c557dea9f0): the per-class selection rates, the selection
of two successive generations, the prior of LA's labeled loss after each of them, and 50
training steps of CReST+'s progressive distribution alignment across 5 generations.

Reference values: the official ``FixMatchCReST._rebuild_labeled_dataset``,
``current_label_dist`` and ``BaseAlgorithm.get_label_dist`` were executed once, unmodified,
on a host object (datasets as dicts of arrays, ``eval_ul_dataset`` returning the
probabilities below), with the ``mu_per_cls`` line of ``FixMatchCReST.__init__`` and the LA
lines of ``run_step`` (lines 187-189: ``l_logits += self.tau * current_label_dist(
normalize="sum").log()``); the official code is not part of this repository. Setting: 5
classes, labeled counts (60, 30, 15, 8, 4), 300 unlabeled images, ALPHA 3, TAU 1,
generation g's probabilities ``softmax(3 * randn(300, 5))`` drawn in turn from
``torch.Generator().manual_seed(0)``.
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.crest import selection_rates

K, NU, COUNTS = 5, 300, (60, 30, 15, 8, 4)
#: official mu_per_cls (index K-1-i is the rate of class i)
MU_PER_CLS = [1.0, 0.7937005162239075, 0.6299605369567871, 0.5108729600906372,
              0.40548014640808105]
#: per generation: images added per class, the sum of their unlabeled indices per class,
#: and tau * log p(y) of the rebuilt labeled set (the official LA offset of the loss)
GENERATIONS = [
    ([26, 23, 42, 42, 69], [3958, 3722, 7361, 6870, 9647],
     [-1.310843825340271, -1.7948992252349854, -1.722139835357666, -1.85316801071167,
      -1.474731683731079]),
    ([20, 35, 34, 57, 53], [3859, 5226, 4997, 7301, 7911],
     [-1.3737155199050903, -1.5813549757003784, -1.8639219999313354, -1.5813549757003784,
      -1.7126909494400024]),
]


def labeled_labels() -> torch.Tensor:
    return torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])


def make_crest(name: str = "crest_plus", **overrides):
    cls = get_algorithm(name)
    return cls(cls.Config(**overrides), K, 8, labeled_labels())


def generation_probs():
    g = torch.Generator().manual_seed(0)
    for _ in GENERATIONS:
        yield (torch.randn(NU, K, generator=g) * 3).softmax(1)


def test_selection_rates_equal_official():
    rates = selection_rates(torch.tensor(COUNTS), 3.0)
    assert rates.tolist() == pytest.approx([MU_PER_CLS[K - 1 - i] for i in range(K)], abs=1e-7)


@pytest.mark.parametrize("name", ["crest", "crest_plus"])
def test_two_generations_selection_and_la_prior_equal_official(name):
    algo = make_crest(name, logit_adjust="loss", la_tau=1.0, generations=3)
    initial_prior = algo.labeled_prior.clone()
    for probs, (per_class, index_sums, offset) in zip(generation_probs(), GENERATIONS,
                                                      strict=True):
        update = algo.update_labeled_set(probs, 0, 30)
        got = torch.bincount(update.labels, minlength=K).tolist()
        assert got == per_class
        assert [int(update.indices[update.labels == k].sum()) for k in range(K)] == index_sums
        assert algo.la_offset.tolist() == pytest.approx(offset, abs=1e-6)
        logits = torch.zeros(2, K)
        assert algo.labeled_logits(logits)[0].tolist() == pytest.approx(offset, abs=1e-6)
    # the alignment target and post-hoc prior stay the initial labeled distribution (p_data)
    assert torch.equal(algo.labeled_prior, initial_prior)


def test_posthoc_keeps_the_initial_prior():
    """Official eval_loop subtracts the initial p_data's log at every generation."""
    algo = make_crest(logit_adjust="posthoc", la_tau=1.0, generations=3)
    before = algo.la_offset.clone()
    for probs in generation_probs():
        algo.update_labeled_set(probs, 0, 30)
    assert torch.equal(algo.la_offset, before)


#: official FixMatchCReST.run_step with CReST+'s progressive alignment (PROGRESSIVE_ALIGN True,
#: TMIN 0.5, GEN_PERIOD_STEPS 10 of MAX_ITER 50, the official DistributionAlignment on the
#: labeled distribution of counts (40, 20, 10, 5)) over 50 steps, run once, unmodified, on a
#: host object (the harness of tests/parity/test_ssl_steps_parity.py: fixed linear network,
#: threshold 0.5); per step (labeled loss, unlabeled loss, official gradual_temp). The inputs are
#: drawn by ``crest_plus_inputs`` below.
CREST_PLUS_STEPS = [
    (4.145469665527344, 2.910691738128662, 1.0),
    (3.81523060798645, 4.626798629760742, 1.0),
    (4.13966703414917, 4.259340763092041, 1.0),
    (5.168630599975586, 3.969261646270752, 1.0),
    (4.619258880615234, 3.4460620880126953, 1.0),
    (6.120294570922852, 3.8114514350891113, 1.0),
    (3.4990298748016357, 3.6257948875427246, 1.0),
    (4.832155704498291, 5.308323860168457, 1.0),
    (3.7268717288970947, 3.0687270164489746, 1.0),
    (4.228424072265625, 3.738779067993164, 1.0),
    (3.9630677700042725, 2.507384777069092, 0.875),
    (6.696261405944824, 1.315281629562378, 0.875),
    (3.757286310195923, 4.628634452819824, 0.875),
    (3.2496514320373535, 3.8484270572662354, 0.875),
    (5.485511779785156, 4.532956600189209, 0.875),
    (3.2377514839172363, 2.698153257369995, 0.875),
    (2.7382688522338867, 4.817605972290039, 0.875),
    (3.3088269233703613, 4.324893474578857, 0.875),
    (1.558048129081726, 3.2015931606292725, 0.875),
    (7.7056684494018555, 2.6096181869506836, 0.875),
    (4.810482501983643, 3.730754852294922, 0.75),
    (4.836631774902344, 3.673111915588379, 0.75),
    (6.116363525390625, 4.3712663650512695, 0.75),
    (3.7187790870666504, 2.7776763439178467, 0.75),
    (4.706953525543213, 5.084873676300049, 0.75),
    (8.087908744812012, 4.6052398681640625, 0.75),
    (4.090461730957031, 2.095109224319458, 0.75),
    (3.256030797958374, 3.1934804916381836, 0.75),
    (3.3566112518310547, 1.720505714416504, 0.75),
    (3.715317487716675, 3.3520755767822266, 0.75),
    (3.7531614303588867, 4.3629279136657715, 0.625),
    (4.755432605743408, 4.256795883178711, 0.625),
    (5.10510778427124, 4.323203086853027, 0.625),
    (1.9668587446212769, 4.038506984710693, 0.625),
    (2.6569247245788574, 3.69326114654541, 0.625),
    (3.180957317352295, 4.191321849822998, 0.625),
    (2.1706860065460205, 2.2459301948547363, 0.625),
    (5.483573913574219, 2.4925730228424072, 0.625),
    (6.243579864501953, 4.199790000915527, 0.625),
    (2.7808237075805664, 1.6574878692626953, 0.625),
    (3.5450704097747803, 4.491788864135742, 0.5),
    (3.8318798542022705, 2.8357439041137695, 0.5),
    (4.375405311584473, 1.878161907196045, 0.5),
    (8.184850692749023, 2.839966297149658, 0.5),
    (6.641014099121094, 4.161547660827637, 0.5),
    (5.549871444702148, 4.336899757385254, 0.5),
    (4.8430023193359375, 6.566005706787109, 0.5),
    (3.538343906402588, 3.7905876636505127, 0.5),
    (6.138025283813477, 4.112471103668213, 0.5),
    (2.5955886840820312, 4.6722540855407715, 0.5),
]


def crest_plus_inputs():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 6, generator=g) * 2, torch.randn(4, generator=g)
    steps = []
    for _ in range(50):
        x_l = torch.randn(8, 6, generator=g)
        y_l = torch.randint(0, 4, (8,), generator=g)
        steps.append((x_l, y_l, torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)))
    return w, b, steps


def test_crest_plus_progressive_alignment_steps_equal_official():
    from imbssl.algorithms import Batch, StepState
    from imbssl.algorithms.crest import gradual_temperature
    from imbssl.models.base import ModelOutput

    class LinearNet(torch.nn.Module):
        def __init__(self, w, b):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(b)
            self.heads = torch.nn.ModuleDict()

        def forward(self, x):
            return ModelOutput(torch.nn.functional.linear(x, self.w, self.b), x)

    w, b, steps = crest_plus_inputs()
    cls = get_algorithm("crest_plus")
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate((40, 20, 10, 5))])
    algo = cls(cls.Config(threshold=0.5, generations=5, t_min=0.5), 4, 6, labels)
    net = LinearNet(w, b)
    for it, ((x_l, y_l, x_w, x_s), (l_cls, l_cons, temp)) in enumerate(
            zip(steps, CREST_PLUS_STEPS, strict=True)):
        batch = Batch(x_lb=x_l, y_lb=y_l, idx_lb=torch.arange(8), x_ulb=[x_w, x_s],
                      idx_ulb=torch.arange(16))
        _, logs = algo.step(batch, StepState(it, 50, net, net))
        assert gradual_temperature(it // 10, 5, 0.5) == pytest.approx(temp)
        assert float(logs["crest/da_temperature"]) == pytest.approx(temp)
        assert float(logs["loss/labeled"]) == pytest.approx(l_cls, abs=1e-5), it
        assert float(logs["loss/unlabeled"]) == pytest.approx(l_cons, abs=1e-5), it
