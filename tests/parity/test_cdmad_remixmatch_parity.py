"""CDMAD's ReMixMatch variant, parity with the official code: the bias measurement, the
debiased guess with its distribution alignment (the alignment window within an epoch, restarted
at the next), the debiased evaluation, and the loss terms with their ramp, on fixed seeded
tensors over 144 training steps.

Reference values: computed once by running, verbatim, the pseudo-label block of ``train()``
(``white = torch.ones((1, 3, 32, 32)); biaseddegree, _ = model(white); outputs_u, _ =
model(inputs_u); if epoch > args.debiasstart: outputs_u = outputs_u - biaseddegree.detach();
p = softmax(outputs_u); ... emp_distb_u ...; pa = p * (target_disb + 1e-6) / (emp_distb_u.mean(0)
+ 1e-6); p = pa / pa.sum(...); targets_u2 = p.detach()``, in the official per-epoch ``train()``
loop that ``main()`` calls with ``emp_distb_u = int(0)`` every epoch), ``validate()``'s debiasing,
``SemiLoss``, ``linear_rampup`` and the ``Lr``, ``Le`` and ``loss`` lines of
``remixmatchcdmad.py`` from github.com/LeeHyuck/CDMAD (commit
7cd732b4615b9d94934a9197e69c6775496fb5ee) on CPU, with the network below (a seeded small_cnn on
3x32x32 inputs, the official solid image's shape) standing in for the official WRN. Official
defaults (--T 1, --lambda-u 2, --rampup 300, --mix_alpha 0.75, --w_ent 0.5, --w_rot 1, labeled
N1 1500 and unlabeled M1 3000 at gamma 100 on CIFAR-10, so the alignment applies), except
``--val-iteration 140`` (so that 144 steps cross the 128-batch window and an epoch boundary) and
``--debiasstart 0`` (debiased from step 140). Between steps the network takes one SGD step (lr
0.1) on the cross-entropy of a fixed labeled batch, identical here.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState, algorithm_class, get_algorithm
from imbssl.algorithms.ops import soft_cross_entropy
from imbssl.models.base import Network
from imbssl.models.small_cnn import SmallCNN

K, B, MU, EPOCH_ITERS, STEPS = 10, 2, 2, 140, 144

#: per recorded step, the official code's values (rounded to 7 significant digits): the bias,
#: the number of batch means in ``emp_distb_u`` and the guessed targets ``targets_u2``
REF_STEPS = {0: {'batch_idx': 0,
     'bias': [0.1441081, 0.1994533, 0.2988023, -0.2092195, -0.2450237, 0.005332842, 0.09341587,
              0.1054219, -0.2464179, -0.1719581],
     'epoch': 0,
     'targets': [[0.3999593, 0.2404059, 0.1472887, 0.0893277, 0.05147948, 0.03096547, 0.01841449,
                  0.01110012, 0.006903439, 0.004155483],
                 [0.4022856, 0.2437421, 0.1437422, 0.08568083, 0.05210495, 0.03185657, 0.01887522,
                  0.01103898, 0.006678983, 0.003994596],
                 [0.4081793, 0.2420713, 0.1414529, 0.08569135, 0.05239778, 0.0311174, 0.01801503,
                  0.01058412, 0.006499315, 0.003991609],
                 [0.402389, 0.2404332, 0.147156, 0.08663736, 0.05153307, 0.03079048, 0.01889744,
                  0.01137085, 0.006804219, 0.003988273]],
     'window': 1},
 1: {'batch_idx': 1,
     'bias': [0.04700641, 0.09530466, 0.195915, -0.2708949, 0.104949, -0.08112602, 0.009741947,
              0.4082032, -0.3048178, -0.2269566],
     'epoch': 0,
     'targets': [[0.3954068, 0.2385169, 0.1405776, 0.08704496, 0.0644846, 0.03124469, 0.01825522,
                  0.01349016, 0.006836692, 0.00414234],
                 [0.3980809, 0.2351595, 0.1387561, 0.08858442, 0.06597281, 0.03073526, 0.0184292,
                  0.01348684, 0.006739264, 0.004055589],
                 [0.3936988, 0.2420288, 0.1422922, 0.08397916, 0.06433907, 0.03176988, 0.01820411,
                  0.01312338, 0.006696966, 0.003867707],
                 [0.39951, 0.2306398, 0.1424248, 0.08885631, 0.06521498, 0.030257, 0.01829277,
                  0.01394479, 0.006776138, 0.004083316]],
     'window': 2},
 5: {'batch_idx': 5,
     'bias': [0.1216706, -0.2029972, -0.1094291, 0.3085788, -0.1910534, -0.007388849, -0.2534114,
              0.5172282, -0.1462455, -0.03121875],
     'epoch': 0,
     'targets': [[0.430419, 0.1973915, 0.1172948, 0.1428029, 0.04647003, 0.02854042, 0.01514475,
                  0.009955274, 0.006920611, 0.005060842],
                 [0.4302463, 0.1962115, 0.1153341, 0.1443837, 0.04618872, 0.02915005, 0.01546072,
                  0.01058757, 0.007315685, 0.005121596],
                 [0.4425354, 0.1936535, 0.1099069, 0.1409112, 0.04583447, 0.0293423, 0.01511507,
                  0.01054135, 0.007039121, 0.005120682],
                 [0.4309028, 0.1932558, 0.1181801, 0.1452034, 0.04650911, 0.02794274, 0.0154442,
                  0.01018487, 0.00716972, 0.005207128]],
     'window': 6},
 126: {'batch_idx': 126,
       'bias': [-0.07260066, 0.01621179, -0.08994745, -0.04802537, 0.5006823, 0.09935489,
                -0.07386702, 0.4219456, -0.2248354, -0.5429462],
       'epoch': 0,
       'targets': [[0.3986595, 0.1898472, 0.1636566, 0.08436195, 0.08677392, 0.03472941,
                    0.01815549, 0.0145109, 0.005921119, 0.003383941],
                   [0.3915141, 0.1917197, 0.1635034, 0.08905066, 0.08995365, 0.03354583,
                    0.01757366, 0.01366992, 0.005927768, 0.003541332],
                   [0.4043995, 0.1870258, 0.1592916, 0.0872269, 0.08835672, 0.03330084, 0.01690046,
                    0.01418561, 0.00586179, 0.003450716],
                   [0.389581, 0.1996811, 0.1611896, 0.08459952, 0.08814219, 0.0358148, 0.01721236,
                    0.01437173, 0.005927213, 0.003480637]],
       'window': 127},
 127: {'batch_idx': 127,
       'bias': [0.1983271, -0.04774974, -0.1475325, -0.1100914, 0.3906259, 0.03869112, -0.1283741,
                0.3128291, -0.2734218, -0.2554303],
       'epoch': 0,
       'targets': [[0.4930146, 0.1674852, 0.1314092, 0.07211003, 0.07062578, 0.02948331,
                    0.01466382, 0.01156601, 0.005261481, 0.004380485],
                   [0.4956322, 0.1575797, 0.1415073, 0.07560936, 0.06912847, 0.02670389,
                    0.01423403, 0.01052756, 0.004752068, 0.004325337],
                   [0.48587, 0.1566211, 0.1432352, 0.07638517, 0.07327162, 0.02820433, 0.01526689,
                    0.01148919, 0.005273688, 0.004382762],
                   [0.4832186, 0.1700493, 0.1390186, 0.06999502, 0.06926549, 0.03144019,
                    0.01537217, 0.01217199, 0.004971869, 0.004496758]],
       'window': 128},
 128: {'batch_idx': 128,
       'bias': [0.1157079, -0.1070511, -0.1994647, -0.1684854, 0.2980202, 0.2973364, -0.1816528,
                0.2185051, 0.00925676, -0.3034471],
       'epoch': 0,
       'targets': [[0.487956, 0.1622706, 0.1333518, 0.07804565, 0.06525989, 0.03785691, 0.01367401,
                    0.01024331, 0.007097116, 0.004244674],
                   [0.4789868, 0.1680411, 0.1366621, 0.07099193, 0.06658308, 0.04172382,
                    0.01451739, 0.01091938, 0.007043751, 0.004530553],
                   [0.4621258, 0.1628564, 0.1510788, 0.07150627, 0.06740914, 0.04518982,
                    0.01617148, 0.01135567, 0.007735033, 0.004571578],
                   [0.4735577, 0.1574264, 0.1425978, 0.07481166, 0.07030448, 0.0416608, 0.01594823,
                    0.01133338, 0.00787162, 0.004487946]],
       'window': 128},
 129: {'batch_idx': 129,
       'bias': [0.0385628, -0.1667128, 0.07022647, -0.218571, 0.2102996, 0.2119388, -0.2327884,
                0.1305443, 0.2768872, -0.3504931],
       'epoch': 0,
       'targets': [[0.4339123, 0.171366, 0.188935, 0.06735959, 0.05899946, 0.04149145, 0.01387707,
                    0.01010406, 0.009603441, 0.004351602],
                   [0.443291, 0.1518418, 0.1900904, 0.07051854, 0.06549115, 0.03817631, 0.01480119,
                    0.0106431, 0.01080559, 0.004340772],
                   [0.4322356, 0.1471999, 0.2115485, 0.07027855, 0.06094415, 0.03802536,
                    0.01534198, 0.009751594, 0.01033225, 0.004342035],
                   [0.4595602, 0.1482217, 0.1858794, 0.07258182, 0.0619122, 0.03448665, 0.01368163,
                    0.009723634, 0.009826641, 0.004126129]],
       'window': 128},
 139: {'batch_idx': 139,
       'bias': [0.06535579, -0.3245117, -0.2282061, 0.1876518, -0.3398281, 0.557942, -0.3951892,
                0.1495273, 0.3635056, -0.08491766],
       'epoch': 0,
       'targets': [[0.4730252, 0.1338098, 0.1386603, 0.1156414, 0.03525707, 0.06037261, 0.01380579,
                    0.01189359, 0.01122055, 0.00631365],
                   [0.475922, 0.1333914, 0.1447494, 0.1179977, 0.03285874, 0.05501865, 0.01317898,
                    0.01053992, 0.01017297, 0.006170212],
                   [0.4868322, 0.1237932, 0.1420029, 0.1195458, 0.03544695, 0.05191923, 0.01315755,
                    0.01076504, 0.0105953, 0.005941796],
                   [0.474514, 0.1404337, 0.135316, 0.1177298, 0.03359996, 0.05759383, 0.01252526,
                    0.01134227, 0.01066521, 0.006280017]],
       'window': 128},
 140: {'batch_idx': 0,
       'bias': [0.0002328157, -0.3687091, -0.2729319, 0.1111975, 0.2606713, 0.4465351, -0.4339955,
                0.07429238, 0.2718439, -0.1400324],
       'epoch': 1,
       'targets': [[0.4026953, 0.2433781, 0.1454146, 0.08576497, 0.05085676, 0.03187213,
                    0.01819293, 0.01096019, 0.006767176, 0.004097811],
                   [0.4106447, 0.2428927, 0.1364118, 0.08751462, 0.05223669, 0.02979961,
                    0.01840425, 0.01123288, 0.006903731, 0.003959087],
                   [0.4027479, 0.2392046, 0.1482403, 0.08616155, 0.05171282, 0.03139802,
                    0.01875435, 0.01107387, 0.006680372, 0.004026095],
                   [0.3967703, 0.2411814, 0.1495519, 0.08786995, 0.05272123, 0.03166827, 0.0188436,
                    0.01081788, 0.006529212, 0.004046344]],
       'window': 1},
 141: {'batch_idx': 1,
       'bias': [0.2615973, -0.4072093, -0.3208198, 0.04078216, 0.499727, 0.3488853, -0.4698279,
                0.002801983, 0.1848305, -0.1973636],
       'epoch': 1,
       'targets': [[0.4138177, 0.2401011, 0.1417045, 0.08316378, 0.05276462, 0.03017044,
                    0.01736543, 0.01068345, 0.006459412, 0.00376961],
                   [0.3980282, 0.2384814, 0.1516285, 0.08463274, 0.05166029, 0.03346898,
                    0.01979767, 0.01118404, 0.006892102, 0.004226052],
                   [0.4159207, 0.2377536, 0.1355492, 0.08882953, 0.05391592, 0.02882437,
                    0.01757768, 0.01113107, 0.006641047, 0.003856832],
                   [0.4011286, 0.2411825, 0.1470996, 0.08685933, 0.05253332, 0.03075119,
                    0.01892575, 0.01075793, 0.006622228, 0.004139672]],
       'window': 2},
 143: {'batch_idx': 3,
       'bias': [0.1040497, -0.4759523, -0.3973822, 0.2452064, 0.3076054, 0.49854, -0.5349163,
                -0.1065779, 0.6135513, -0.2889452],
       'epoch': 1,
       'targets': [[0.3932757, 0.247567, 0.1470846, 0.0844906, 0.04965976, 0.0367224, 0.01924218,
                    0.01091373, 0.006885676, 0.004158327],
                   [0.4127802, 0.240191, 0.1393296, 0.08831096, 0.05072286, 0.03048087, 0.01741354,
                    0.01044237, 0.006403888, 0.00392474],
                   [0.4052497, 0.2353368, 0.1409169, 0.09379242, 0.05425908, 0.02930692,
                    0.01851078, 0.01142834, 0.007256066, 0.003942944],
                   [0.4018984, 0.2352204, 0.1507126, 0.0883396, 0.05210656, 0.03155418, 0.01855128,
                    0.0106042, 0.006992749, 0.004019954]],
       'window': 4}}

REF_EVAL = {'logits': [[0.6656079, -1.145283, 0.5230259, 2.033912, 2.00166, -3.162096, -0.4500554, 0.1205309,
             1.157136, -0.5309834],
            [0.6244233, -1.135322, 0.5906654, 2.000384, 1.979928, -3.104417, -0.3960549, 0.1188044,
             1.191492, -0.501514],
            [0.6214235, -1.088822, 0.5494208, 1.949228, 1.928574, -3.076385, -0.3782534, 0.1139069,
             1.07818, -0.5185844],
            [0.6358356, -1.064607, 0.5989839, 1.961569, 1.920276, -3.087884, -0.357756, 0.1202878,
             1.103193, -0.5534344],
            [0.6388272, -1.17509, 0.553993, 1.980384, 2.018887, -3.155771, -0.4131088, 0.1264403,
             1.206825, -0.533622],
            [0.6033089, -1.18522, 0.5239379, 2.00567, 2.049298, -3.184362, -0.4127703, 0.1448047,
             1.245319, -0.5233928]],
 'prediction': [8, 8, 8, 8, 8, 8],
 'prediction_debiased': [3, 3, 3, 3, 4, 4]}

#: official SemiLoss (Lx = Lx1 + Lx2), Lr and Le on the fixed tensors of ``_loss_tensors``
REF_LOSS_PARTS = {'Lx': 5.304156, 'Lu': 2.534795, 'Lr': 1.555882, 'Le': 2.784455}
#: (epoch, batch_idx, w_rot, w = lambda_u * linear_rampup(epoch + batch_idx / 500), loss)
REF_TOTALS = [(0, 0, 1, 0.0, 6.860038), (0, 250, 1, 0.003333333, 6.870808),
              (12, 17, 1, 0.08022667, 7.119243), (150, 0, 0.5, 1.0, 9.313005),
              (299, 499, 1, 1.999987, 13.32181), (300, 3, 1, 2.0, 13.32185)]
#: official make_imb_data(1500, 10, 100, 'long'): the labeled counts (target_disb's shape)
LABELED_COUNTS = [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]


def _config(**overrides):
    cfg = dict(base="remixmatch", lambda_u=2.0, dist_align="labeled", epoch_iters=EPOCH_ITERS,
               debias_after_epochs=0)
    cfg.update(overrides)
    return get_algorithm("cdmad").Config(**cfg)


def _algorithm(**overrides):
    cfg = _config(**overrides)
    labels = torch.repeat_interleave(torch.arange(K), torch.tensor(LABELED_COUNTS))
    return algorithm_class("cdmad", cfg)(cfg, K, 64, labels)


def _fixture():
    """The seeded network, data and optimizer of the reference run."""
    torch.manual_seed(0)
    net = Network(SmallCNN(K, in_channels=3), {}).train()
    gen = torch.Generator().manual_seed(1)
    x_lb = torch.randn(STEPS, B, 3, 32, 32, generator=gen)
    y_lb = torch.randint(0, K, (STEPS, B), generator=gen)
    x_u = torch.randn(STEPS, MU * B, 3, 32, 32, generator=gen)
    x_test = torch.randn(6, 3, 32, 32, generator=gen)
    return net, x_lb, y_lb, x_u, x_test, torch.optim.SGD(net.parameters(), lr=0.1)


def _close(got, want, atol=1e-5, rtol=1e-5):
    return torch.allclose(torch.as_tensor(got).float(), torch.tensor(want), atol=atol, rtol=rtol)


def _replay(algo, check):
    """The reference run's steps through the functions ``ReMixMatchCDMAD.step`` calls, in its
    order: the bias (train mode, first), the window's restart, the weak view's forward (no
    gradient), the guess; ``check(step, ref, values)`` at every recorded step. Returns the
    evaluated network."""
    net, x_lb, y_lb, x_u, x_test, opt = _fixture()
    for step in range(STEPS):
        bias = algo.measure_training_bias(net, x_lb[step])
        algo.restart_alignment_window(step)
        with torch.no_grad():
            out = net(x_u[step])
        targets, _, _ = algo.guess_targets(out.logits, out.features,
                                           StepState(step, STEPS, net, net))
        if step in REF_STEPS:
            window = min(int(algo.dist_align.count), 128) if algo.dist_align is not None else 0
            check(step, REF_STEPS[step], {"bias": bias, "targets": targets, "window": window})
        loss = F.cross_entropy(net(x_lb[step]).logits, y_lb[step])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return algo.eval_predictor(net)(net(x_test))


def test_bias_guess_and_alignment_window_equal_the_official_over_144_steps():
    seen = []

    def check(step, ref, got):
        assert _close(got["bias"], ref["bias"]), step
        assert got["window"] == ref["window"], step
        assert _close(got["targets"], ref["targets"]), (step, got["targets"], ref["targets"])
        seen.append(step)

    # the replay makes the reference run's forwards one by one, as the official loop does, so
    # the solid image's batch-norm update is the full one (no scaling to a share)
    eval_logits = _replay(_algorithm(bias_bn_update_scale=1.0), check)
    assert seen == sorted(REF_STEPS)
    assert _close(eval_logits, REF_EVAL["logits"])
    assert eval_logits.argmax(-1).tolist() == REF_EVAL["prediction_debiased"]
    # the reference is informative: the window fills, restarts with the epoch, the bias moves
    # and the debiased evaluation differs from the raw one
    assert [REF_STEPS[s]["window"] for s in (126, 127, 128, 139, 140, 141)] == \
        [127, 128, 128, 128, 1, 2]
    assert not _close(REF_STEPS[0]["bias"], REF_STEPS[143]["bias"], atol=1e-2)
    assert REF_EVAL["prediction"] != REF_EVAL["prediction_debiased"]


def test_the_reference_tells_each_official_choice_apart():
    """Without the debiasing, without the window's restart or without the alignment,
    imbssl's guesses differ from the reference (from the step each one first acts on; at step
    140 the alignment over a one-batch window cancels the debiasing's per-class factor), so the
    parity test can fail."""
    for overrides, first_bad in (({"debias_after_epochs": 1000}, 140),
                                 ({"dist_align_epoch_reset": False}, 140),
                                 ({"dist_align": "none"}, 0)):
        bad: list[int] = []

        def check(step, ref, got, bad=bad):
            if not _close(got["targets"], ref["targets"]):
                bad.append(step)

        _replay(_algorithm(bias_bn_update_scale=1.0, **overrides), check)
        assert bad and min(bad) >= first_bad, (overrides, bad)


def _loss_tensors():
    """The fixed tensors the official ``SemiLoss``, ``Lr`` and ``Le`` lines ran on."""
    g = torch.Generator().manual_seed(2)
    ox, ox2, ou = (torch.randn(n, K, generator=g) for n in (4, 4, 12))
    tx = torch.softmax(torch.randn(4, K, generator=g), 1)
    yx = torch.randint(0, K, (4,), generator=g)
    tu = torch.softmax(torch.randn(12, K, generator=g), 1)
    logits_r = torch.randn(4, 4, generator=g)
    rot = torch.randint(0, 4, (4,), generator=g)
    outputs_u2 = torch.randn(4, K, generator=g)
    targets_u2 = torch.softmax(torch.randn(4, K, generator=g), 1)
    return ox, ox2, tx, yx, ou, tu, logits_r, rot, outputs_u2, targets_u2


def test_loss_terms_and_their_ramp_equal_the_official():
    """L = Lx1 + Lx2 + w(t) lambda_u Lu + w(t) lambda_kl Le + lambda_rot Lr, with the terms as
    ``ReMixMatch.step`` and ``ReMixMatchCDMAD.step`` compute them (soft CE on log-softmax; the
    official log(softmax + 1e-8) differs by float rounding here) and w(t) linear over the whole
    official run (300 epochs of 500 steps: ``rampup_ratio`` 1 of 150000 steps)."""
    ox, ox2, tx, yx, ou, tu, logits_r, rot, outputs_u2, targets_u2 = _loss_tensors()
    algo = _algorithm()
    lx = soft_cross_entropy(ox, tx).mean() + algo.labeled_loss(ox2, yx)
    lu = soft_cross_entropy(ou, tu).mean()
    lr = F.cross_entropy(logits_r, rot)
    le = soft_cross_entropy(outputs_u2, targets_u2).mean()
    assert _close([lx, lu, lr, le], [REF_LOSS_PARTS[k] for k in ("Lx", "Lu", "Lr", "Le")])
    cfg = algo.cfg
    for epoch, batch_idx, w_rot, w, want in REF_TOTALS:
        ramp = algo.consistency_ramp(StepState(epoch * 500 + batch_idx, 300 * 500, None, None))
        assert abs(cfg.lambda_u * ramp - w) < 1e-6, (epoch, batch_idx)
        total = lx + ramp * (cfg.lambda_u * lu + cfg.lambda_kl * le) + w_rot * lr
        assert _close(total, want), (epoch, batch_idx)
    assert cfg.lambda_rot == REF_TOTALS[0][2] and cfg.lambda_kl == 0.5 and cfg.temperature == 1
