"""CPE parity: imbssl's three experts (``CPE.expert_step``: logit-adjusted labeled losses,
pseudo-labels, classwise-BN branch consistency losses) and their pseudo-label share estimates
equal the official code's on fixed seeded logits, over three steps (the shares carry over).

Reference values: computed once by running ``CPE.train_step`` of
``semilearn/imb_algorithms/cpe/cpe.py`` from github.com/machengcheng2016/CPE-LTSSL (commit
dedd59841e3404e3283478ac662d22ee143a43fd) on CPU, its USB base class replaced by a stand-in
object holding the official defaults (la_tau_lb 0/2/4, cut1 2, cut2 4, p_cutoff 0.95,
ulb_loss_ratio 1, ema_u 0.9, est_epoch 0, epoch 1 so the shares update), USB's
``ce_loss`` (``semilearn/core/criterions/cross_entropy.py``) and a "network" that returns the
seeded logits of each expert's three CBN branches (``logitsH/M/T``, ``logitsH2``, ...; the
expert's logits their mean, as ``CBNNet``). The per-class precision/recall bookkeeping
(``update_precision_recall``, true labels, logging only) was left out. ``sup`` are the three
experts' labeled losses (the official ``ce_loss`` calls with ``reduction='mean'``),
``unsup_uniform`` and ``mask_uniform`` the official log (expert 2), ``u_py``/``au_py`` the
official share estimates after the step.
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms.cpe import CPE, CPEConfig

K, NUM_LB, NUM_ULB, STEPS = 10, 4, 12, 3
COUNTS = [30, 20, 12, 8, 6, 5, 4, 3, 2, 2]  # labeled class counts: official p_hat_lb
REF = [
    {
        "total": 74.49951126426109,
        "sup": [12.0503937177351, 12.311899815042883, 8.188107700355179],
        "unsup_uniform": 13.612652778625488,
        "mask_uniform": 0.3333333432674408,
        "u_py": [
            [0.08999999613, 0.08999999613, 0.08999999613, 0.08999999613, 0.1400000006, 0.08999999613, 0.08999999613, 0.1400000006, 0.08999999613, 0.08999999613],
            [0.1149999946, 0.08999999613, 0.08999999613, 0.08999999613, 0.08999999613, 0.08999999613, 0.1649999917, 0.08999999613, 0.08999999613, 0.08999999613],
            [0.1099999994, 0.1099999994, 0.1099999994, 0.1099999994, 0.08999999613, 0.08999999613, 0.1099999994, 0.08999999613, 0.08999999613, 0.08999999613],
        ],
        "au_py": [
            [0.09833332896, 0.1066666618, 0.09833332896, 0.09833332896, 0.1400000006, 0.08999999613, 0.08999999613, 0.09833332896, 0.08999999613, 0.08999999613],
            [0.09833332896, 0.1066666618, 0.08999999613, 0.1066666618, 0.09833332896, 0.09833332896, 0.1149999946, 0.09833332896, 0.08999999613, 0.09833332896],
            [0.1066666618, 0.1066666618, 0.1066666618, 0.1066666618, 0.09833332896, 0.09833332896, 0.09833332896, 0.08999999613, 0.08999999613, 0.09833332896],
        ],
    },
    {
        "total": 86.44495138125207,
        "sup": [17.972318790452118, 9.539895999923496, 5.296178058161609],
        "unsup_uniform": 18.391416549682617,
        "mask_uniform": 0.3333333432674408,
        "u_py": [
            [0.08099999279, 0.08099999279, 0.08099999279, 0.08099999279, 0.1459999979, 0.08099999279, 0.1410000026, 0.126000002, 0.1009999961, 0.08099999279],
            [0.1034999937, 0.08099999279, 0.1309999973, 0.1059999913, 0.08099999279, 0.08099999279, 0.1735000014, 0.08099999279, 0.08099999279, 0.08099999279],
            [0.1490000039, 0.09899999946, 0.09899999946, 0.09899999946, 0.08099999279, 0.08099999279, 0.1490000039, 0.08099999279, 0.08099999279, 0.08099999279],
        ],
        "au_py": [
            [0.08849999309, 0.1126666591, 0.08849999309, 0.08849999309, 0.1426666677, 0.08099999279, 0.1143333316, 0.09683332592, 0.08933332562, 0.09766665846],
            [0.08849999309, 0.1043333262, 0.1059999913, 0.1043333262, 0.1051666588, 0.09683332592, 0.1118333265, 0.09683332592, 0.08099999279, 0.1051666588],
            [0.1209999919, 0.1043333262, 0.1043333262, 0.09599999338, 0.08849999309, 0.1134999916, 0.1134999916, 0.08933332562, 0.08099999279, 0.08849999309],
        ],
    },
    {
        "total": 82.07512106501815,
        "sup": [13.376028903358941, 12.720168958477931, 18.27017724676039],
        "unsup_uniform": 16.730979919433594,
        "mask_uniform": 0.3333333432674408,
        "u_py": [
            [0.1128999889, 0.07289998978, 0.07289998978, 0.07289998978, 0.1313999891, 0.09289999306, 0.1468999982, 0.1133999974, 0.09089999646, 0.09289999306],
            [0.09314998984, 0.09789998829, 0.1178999916, 0.09539999068, 0.09789998829, 0.09789998829, 0.1561499983, 0.07289998978, 0.07289998978, 0.09789998829],
            [0.1741000116, 0.08909999579, 0.08909999579, 0.08909999579, 0.07289998978, 0.09289999306, 0.134100005, 0.07289998978, 0.09289999306, 0.09289999306],
        ],
        "au_py": [
            [0.1046499908, 0.1097333208, 0.09631665796, 0.07964999229, 0.1450666636, 0.08123332262, 0.1195666641, 0.08714999259, 0.08039999008, 0.09623332322],
            [0.07964999229, 0.1188999861, 0.1120666564, 0.1022333205, 0.1029833257, 0.1038166583, 0.1006499901, 0.08714999259, 0.08123332262, 0.1113166586],
            [0.1338999867, 0.1022333205, 0.1022333205, 0.08639999479, 0.07964999229, 0.1188166589, 0.110483326, 0.08039999008, 0.08956665546, 0.09631665796],
        ],
    },
]


def seeded_inputs(step: int):
    """Each expert's (3 branches, N, K) logits and the labeled labels (as the reference run;
    it drew the unlabeled labels after them, which imbssl never sees)."""
    g = torch.Generator().manual_seed(100 + step)
    n = NUM_LB + 2 * NUM_ULB
    logits = [10.0 * torch.randn(3, n, K, generator=g) for _ in range(3)]
    y_lb = torch.randint(0, K, (NUM_LB,), generator=g)
    return logits, y_lb


def test_experts_and_shares_equal_the_official_code_over_three_steps():
    cfg = CPEConfig()
    labeled = torch.repeat_interleave(torch.arange(K), torch.tensor(COUNTS))
    algo = CPE(cfg, K, 8, labeled)
    sizes = [NUM_LB, NUM_ULB, NUM_ULB]
    for step, ref in enumerate(REF):
        logits, y_lb = seeded_inputs(step)
        results = [algo.expert_step(e, logits[e], sizes, y_lb, torch.zeros(NUM_ULB, 8),
                                    cfg.epoch_iters + step) for e in range(3)]
        sup = [float(r.loss_x) for r in results]
        total = sum(float(r.loss_x + cfg.lambda_u * r.loss_u) for r in results)
        assert sup == pytest.approx(ref["sup"], rel=1e-5), step
        assert float(results[1].loss_u) == pytest.approx(ref["unsup_uniform"], rel=1e-5), step
        assert float(results[1].mask.mean()) == pytest.approx(ref["mask_uniform"], abs=1e-7)
        assert total == pytest.approx(ref["total"], rel=1e-5), step
        assert torch.allclose(algo.confident_share, torch.tensor(ref["u_py"]), atol=1e-6), step
        assert torch.allclose(algo.all_share, torch.tensor(ref["au_py"]), atol=1e-6), step


def test_the_shares_do_not_move_in_the_first_epoch():
    """Official ``self.epoch > self.est_epoch`` with est_epoch 0: no update in epoch 0."""
    cfg = CPEConfig()
    labeled = torch.repeat_interleave(torch.arange(K), torch.tensor(COUNTS))
    algo = CPE(cfg, K, 8, labeled)
    logits, y_lb = seeded_inputs(0)
    algo.expert_step(1, logits[1], [NUM_LB, NUM_ULB, NUM_ULB], y_lb, torch.zeros(NUM_ULB, 8),
                     cfg.epoch_iters - 1)
    assert torch.equal(algo.confident_share, torch.full((3, K), 1.0 / K))
