"""CoSSL parity: the weight-imprinted classifier, the warm-up's TFE feature set, the warm-up
classifier training (Adam, EMA) and then three co-learning steps of the balanced classifier (TFE
mixing and its loss, the head carried over from the warm-up) equal the official code's on fixed
seeded features.

Reference values: computed once by running ``weight_imprint``, ``TFE`` and ``classifier_train``
of ``utils/tfe_init.py`` and the classifier block of ``train`` in ``train_cifar_fix_cossl.py``
(the TFE mixing loop, the teacher loss, its Adam step and ``WeightEMA``) from
github.com/YUE-FAN/CoSSL (commit 9c7b8401b912bf266297c2763300892daa9a0495), on CPU, with an
identity encoder (the inputs are the features), K = 3 classes of 5, 3 and 2 labeled features,
6 unlabeled ones (a weak and a strong view), ``np.random.seed(0)`` before ``TFE``, a full batch
and EMA decay 0.9 in the warm-up, ``random.seed(0)`` / ``np.random.seed(0)`` before the
co-learning steps and ``max_lam`` 0.6. The co-learning draws (``random.random()`` per row, then
``np.random.uniform(max_lam, 1)`` where it mixes; lam 1.0 where it does not) are stored below.
In an imbssl run the co-learning head is stepped by the trainer's optimizer; here by Adam, as
the official ``teacher_optimizer``, so that the loss is checked over several steps.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imbssl.algorithms.cossl import (
    CoSSLConfig,
    imprinted_weights,
    soft_cross_entropy,
    tfe_feature_set,
    tfe_mix,
    tfe_probability,
    train_warm_classifier,
)

K, D = 3, 4
COUNTS = [5, 3, 2]
REF_IMPRINTED = [[-0.3549596667289734, -0.6521252393722534, 0.43839046359062195, -0.5065076947212219],
 [0.05067110061645508, -0.7215595841407776, 0.2811245620250702, 0.6306767463684082],
 [0.20518766343593597, -0.066535085439682, -0.8328908085823059, 0.5096704959869385]]
REF_TFE_FEATS = [[-1.1258398294448853, -1.152360200881958, -0.2505785822868347, -0.4338788092136383],
 [0.8487103581428528, 0.6920091509819031, -0.31601276993751526, -2.1152193546295166],
 [0.32227492332458496, -1.2633347511291504, 0.34998318552970886, 0.30813392996788025],
 [0.11984150856733322, 1.237657904624939, 1.1167771816253662, -0.2472781538963318],
 [-1.3526537418365479, -1.6959311962127686, 0.5666506290435791, 0.7935083508491516],
 [0.5988394618034363, -1.5550950765609741, -0.3413603901863098, 1.85300612449646],
 [-0.21586325764656067, -0.7425481677055359, 0.5627213716506958, 0.25962740182876587],
 [-0.17396099865436554, -0.678746223449707, 0.9382607340812683, 0.4888698160648346],
 [1.203223705291748, 0.08453469723463058, -1.2001394033432007, -0.004785737954080105],
 [-0.5180748105049133, -0.30670419335365295, -1.580993890762329, 1.7066433429718018],
 [0.3886670172214508, -1.1857606172561646, 0.05307239294052124, 0.7798840999603271],
 [-1.2279258966445923, -1.5913265943527222, 0.5662195086479187, 0.7349313497543335],
 [0.4735100269317627, 0.1994481384754181, -0.5032787322998047, 0.28040140867233276],
 [1.1430635452270508, 0.11460775136947632, -1.1813002824783325, -0.045023489743471146],
 [-0.7795631885528564, -0.4801484942436218, -1.4121694564819336, 1.5285916328430176]]
REF_TFE_TARGETS = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 2]
WARM_INIT_W = [[-0.0450136661529541, 0.0724719762802124, -0.0019974112510681152, 0.43708336353302],
 [0.155595064163208, -0.18620312213897705, -0.3019806742668152, -0.08380782604217529],
 [-0.21567034721374512, -0.16022425889968872, 0.0239408016204834, 0.29806387424468994]]
WARM_INIT_B = [0.27176833152770996, -0.48877543210983276, 0.3099602460861206]
REF_WARM = {"w": [[-0.05301222205162048, 0.08046554774045944, 0.006000121124088764, 0.42908528447151184],
 [0.14759738743305206, -0.19420160353183746, -0.2939808666706085, -0.07580925524234772],
 [-0.20767225325107574, -0.15222492814064026, 0.01594209112226963, 0.30605649948120117]],
            "b": [0.2637764811515808, -0.4807779788970947, 0.301960289478302],
            "ema_w": [[-0.04682324826717377, 0.07428082823753357, -0.00018797483062371612, 0.43527379631996155],
 [0.1537855863571167, -0.18801270425319672, -0.3001708984375, -0.08199823647737503],
 [-0.21386080980300903, -0.15841452777385712, 0.022131189703941345, 0.2998725473880768]],
            "ema_b": [0.2699597179889679, -0.48696595430374146, 0.30815044045448303]}
#: per co-learning step: labels, official draws (u, lam), teacher loss, head and EMA head after
REF_CO_STEPS = [{'b': [0.26177647709846497, -0.4787779748439789, 0.29996028542518616],
  'draws': [(0.8444218515250481, 1.0), (0.7579544029403025, 1.0),
            (0.420571580830845, 0.8195254015709299), (0.25891675029296335, 0.8860757465489677)],
  'ema_b': [0.26914140582084656, -0.4861471354961395, 0.3073314130306244],
  'ema_w': [[-0.047642145305871964, 0.0746992975473404, 0.00023083476116880774,
             0.43445491790771484],
            [0.15336675941944122, -0.18843159079551697, -0.29935187101364136,
             -0.08117933571338654],
            [-0.21344195306301117, -0.1579955667257309, 0.021312279626727104,
             0.3006909191608429]],
  'loss': 1.7368710041046143,
  'w': [[-0.05501222237944603, 0.0784655511379242, 0.004000120796263218, 0.427085280418396],
        [0.1495973914861679, -0.19220159947872162, -0.2919808626174927, -0.07380925863981247],
        [-0.2096722573041916, -0.1542249321937561, 0.013942090794444084, 0.308056503534317]],
  'y': [0, 1, 2, 1]},
 {'b': [0.2598099410533905, -0.4783163368701935, 0.301043301820755],
  'draws': [(0.5112747213686085, 0.8411053504286575), (0.4049341374504143, 1.0),
            (0.7837985890347726, 1.0), (0.30331272607892745, 0.8179532731987588)],
  'ema_b': [0.26820826530456543, -0.48536404967308044, 0.3067026138305664],
  'ema_w': [[-0.04843311756849289, 0.0750311091542244, 0.00041484448593109846,
             0.4336106777191162],
            [0.1531238704919815, -0.18865516781806946, -0.29849329590797424, -0.0803188905119896],
            [-0.21324701607227325, -0.15778475999832153, 0.020517343655228615,
             0.3014024496078491]],
  'loss': 0.7681928873062134,
  'w': [[-0.05555187910795212, 0.07801743596792221, 0.0020709321834146976, 0.4260126054286957],
        [0.15093791484832764, -0.1906673014163971, -0.29076606035232544, -0.07257494330406189],
        [-0.21149256825447083, -0.1558876782655716, 0.013362940400838852, 0.30780649185180664]],
  'y': [2, 0, 2, 2]},
 {'b': [0.25790542364120483, -0.477002888917923, 0.3006409704685211],
  'draws': [(0.4765969541523558, 1.0), (0.5833820394550312, 1.0), (0.9081128851953352, 1.0),
            (0.5046868558173903, 1.0)],
  'ema_b': [0.2671779692173004, -0.48452791571617126, 0.30609646439552307],
  'ema_w': [[-0.04927816241979599, 0.07533518970012665, 0.0004197552043478936,
             0.4327271282672882],
            [0.15306559205055237, -0.18883052468299866, -0.2976146340370178,
             -0.07938876748085022],
            [-0.21325357258319855, -0.15764528512954712, 0.019746987149119377,
             0.3019161820411682]],
  'loss': 1.5910327434539795,
  'w': [[-0.056883588433265686, 0.0780719593167305, 0.0004639517283067107, 0.42477527260780334],
        [0.1525411605834961, -0.1904088705778122, -0.2897069752216339, -0.07101769000291824],
        [-0.21331259608268738, -0.15639008581638336, 0.012813789770007133, 0.306539922952652]],
  'y': [1, 1, 1, 1]}]


def _inputs():
    """The seeded features of the reference run, and its generator (for the co-learning steps)."""
    g = torch.Generator().manual_seed(0)
    feats_l = torch.randn(sum(COUNTS), D, generator=g)
    labels_l = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    feats_weak = torch.randn(6, D, generator=g)
    feats_strong = torch.randn(6, D, generator=g)
    return feats_l, labels_l, feats_weak, feats_strong, g


def _numpy_draws(k: int, n_k: int, size: int):
    """The official TFE's draws from numpy's global generator (seeded by the caller)."""
    a_idx = np.random.choice(list(range(n_k)), size, replace=True)
    lam = np.random.beta(0.75, 0.75, size=size)
    return torch.as_tensor(a_idx), torch.as_tensor(lam, dtype=torch.float32)


def _warm_set():
    feats_l, labels_l, feats_weak, feats_strong, g = _inputs()
    weights = imprinted_weights(feats_l, labels_l, K)
    probs_l = torch.softmax(feats_l @ weights.T, dim=1)
    probs_u = torch.softmax(feats_weak @ weights.T, dim=1)
    np.random.seed(0)
    feats, targets = tfe_feature_set(feats_l, labels_l, probs_l, feats_strong, probs_u, COUNTS,
                                     _numpy_draws)
    return weights, feats, targets, g


def _close(a, b, atol=1e-6):
    return torch.allclose(torch.as_tensor(a), torch.tensor(b), atol=atol, rtol=0)


def test_imprinted_weights_and_tfe_set_equal_the_official():
    weights, feats, targets, _ = _warm_set()
    assert _close(weights, REF_IMPRINTED)
    assert _close(feats, REF_TFE_FEATS)
    assert targets.argmax(1).tolist() == REF_TFE_TARGETS
    assert torch.equal(targets.sum(0), torch.tensor([5.0, 5.0, 5.0]))  # class-balanced


def _warm_heads():
    _, feats, targets, g = _warm_set()
    head = nn.Linear(D, K)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(WARM_INIT_W))
        head.bias.copy_(torch.tensor(WARM_INIT_B))
    ema_head = nn.Linear(D, K).requires_grad_(False)
    ema_head.load_state_dict(head.state_dict())
    cfg = CoSSLConfig(warm_iterations=4, warm_batch_size=len(feats), warm_ema_decay=0.9)
    train_warm_classifier(head, ema_head, feats, targets, cfg, torch.Generator().manual_seed(5))
    return head, ema_head, g


def test_warm_up_classifier_equals_the_official():
    head, ema_head, _ = _warm_heads()
    assert _close(head.weight.detach(), REF_WARM["w"])
    assert _close(head.bias.detach(), REF_WARM["b"])
    assert _close(ema_head.weight, REF_WARM["ema_w"])
    assert _close(ema_head.bias, REF_WARM["ema_b"])


def test_co_learning_steps_after_the_warm_up_equal_the_official():
    head, ema_head, g = _warm_heads()
    opt = torch.optim.Adam([{"params": [head.weight], "weight_decay": 5e-4},
                            {"params": [head.bias], "weight_decay": 0.0}], lr=0.002)
    tfe_prob = tfe_probability(torch.tensor(COUNTS))
    for ref in REF_CO_STEPS:
        feats_x = torch.randn(4, D, generator=g)
        labels = torch.randint(K, (4,), generator=g)
        feats_u = torch.randn(5, D, generator=g)
        assert labels.tolist() == ref["y"]
        u, lam = (torch.tensor(v, dtype=torch.float64) for v in zip(*ref["draws"]))
        mixed = u < tfe_prob.double()[labels]
        assert torch.equal(mixed, lam < 1.0)  # a row mixes exactly where a lam was drawn
        feats = tfe_mix(feats_x, labels, feats_u, mixed, lam.float())
        loss = soft_cross_entropy(head(feats), torch.eye(K)[labels])
        assert abs(float(loss.detach()) - ref["loss"]) < 1e-5
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema_head.parameters(), head.parameters(), strict=True):
                e.mul_(0.9).add_(p * 0.1)
        assert _close(head.weight.detach(), ref["w"]) and _close(head.bias.detach(), ref["b"])
        assert _close(ema_head.weight, ref["ema_w"]) and _close(ema_head.bias, ref["ema_b"])


def test_tfe_probability_is_zero_for_the_largest_class():
    assert _close(tfe_probability(torch.tensor([1500, 150, 15])), [0.0, 0.9, 0.99])
