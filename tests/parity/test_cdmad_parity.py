"""CDMAD parity: the bias measurement, the debiased pseudo-labels and the debiased evaluation
equal the official code's on fixed seeded tensors, over four training steps (the network moves
between them, so the bias changes).

Reference values: computed once by running, verbatim, the pseudo-label block of ``train()``
(``white = torch.ones((1, 3, 32, 32)); biaseddegree, _ = model(white); outputs_u, _ =
model(inputs_u); if epoch > args.debiasstart: outputs_u = outputs_u - biaseddegree;
targets_u2 = F.softmax(outputs_u); ... select_mask = max_p.ge(args.tau)``) and the debiasing
of ``validate()`` (``model.eval(); biaseddegree, _ = model(white); outputs2 = outputs -
biaseddegree; prediction2 = argmax softmax(outputs2)``) of ``fixmatchcdmad.py`` from
github.com/LeeHyuck/CDMAD (commit 7cd732b4615b9d94934a9197e69c6775496fb5ee; defaults --tau 0,
--debiasstart 100, --unlabeledratio 2) on CPU, with the network below (a seeded small_cnn on
3x32x32 inputs, the official solid image's shape) standing in for the official WRN. Between
steps the network takes one SGD step (lr 0.5) on the cross-entropy of a fixed labeled batch,
identical here. The epochs of the four steps are 100, 101, 101, 250: no debiasing, then
debiasing.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.cdmad import debiased_logits, measure_bias, solid_image
from imbssl.models.base import Network
from imbssl.models.small_cnn import SmallCNN

K, B, MU, STEPS, EPOCH_ITERS = 10, 4, 2, 4, 500

#: per step, the official code's values (rounded to 7 significant digits)
REF = [{'bias': [0.1441081, 0.1994533, 0.2988023, -0.2092195, -0.2450237, 0.005332842, 0.09341587,
           0.1054219, -0.2464179, -0.1719581],
  'epoch': 100,
  'eval_bias': [0.08183986, 0.03795343, 0.1497513, 0.05281457, -0.1342326, 0.06283902,
                0.09536031, 0.04597368, 0.007548379, -0.07542108],
  'eval_logits': [[-0.02873032, 0.0596943, 0.04204147, -0.0289384, 0.01260394, -0.02500706,
                   -0.006268062, -0.004150387, 0.02606538, -0.05100654],
                  [-0.03217012, 0.06144996, 0.0432644, -0.03306135, 0.0118213, -0.02361535,
                   -0.006713361, -0.001494225, 0.02827271, -0.05342497],
                  [-0.03374146, 0.06274219, 0.04290713, -0.03091208, 0.0131285, -0.02600912,
                   -0.006614253, -0.005911645, 0.02919615, -0.05305523],
                  [-0.03367853, 0.06504497, 0.04576728, -0.03300609, 0.01039064, -0.02610872,
                   -0.00828027, -0.002780404, 0.02921409, -0.05497666],
                  [-0.03029757, 0.06197974, 0.04282327, -0.03246836, 0.01134428, -0.02339373,
                   -0.004194751, -0.00119774, 0.0300494, -0.05601551],
                  [-0.03569682, 0.06152391, 0.04431908, -0.03066189, 0.01461528, -0.0284806,
                   -0.008258492, -0.005887248, 0.03114085, -0.05072302]],
  'mask': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
  'prediction': [2, 2, 2, 2, 2, 2],
  'prediction_debiased': [1, 1, 1, 1, 1, 1],
  'targets': [[0.1208565, 0.1257835, 0.1320402, 0.07595508, 0.06905423, 0.09504926, 0.1119473,
               0.1162483, 0.0733986, 0.07966688],
              [0.1171988, 0.1268859, 0.1374864, 0.07561532, 0.07045536, 0.09730502, 0.1067309,
               0.1133044, 0.07546808, 0.07954979],
              [0.1166005, 0.1265423, 0.1339708, 0.07479927, 0.07025491, 0.0962198, 0.1089626,
               0.1159931, 0.07672004, 0.07993664],
              [0.1176604, 0.1211243, 0.1369841, 0.07527196, 0.07268431, 0.09893558, 0.1089426,
               0.115407, 0.07271272, 0.08027714],
              [0.1174284, 0.1244, 0.1337782, 0.0775542, 0.07114968, 0.09790611, 0.1108252,
               0.1092793, 0.07381205, 0.0838668],
              [0.12034, 0.1232912, 0.1358422, 0.07687838, 0.06959892, 0.09722135, 0.1080669,
               0.1141429, 0.07398807, 0.08063009],
              [0.1227454, 0.1215796, 0.1309943, 0.07560121, 0.07125573, 0.09594738, 0.1137036,
               0.1153794, 0.07170211, 0.0810913],
              [0.118616, 0.1238966, 0.13466, 0.0770873, 0.07123147, 0.09672175, 0.1074547,
               0.117236, 0.07098302, 0.08211327]]},
 {'bias': [-0.3390782, 0.7495679, 0.7185042, 0.510255, -0.5833353, -0.4020989, -0.3737924,
           -0.3518644, -0.5566683, 0.5114516],
  'epoch': 101,
  'eval_bias': [-0.003032587, 0.2287762, 0.1426673, 0.1753912, -0.227474, -0.0009314232,
                -0.009129833, -0.05881513, -0.07942484, 0.1107838],
  'eval_logits': [[-0.04415265, 0.147449, 0.03781851, 0.04623735, -0.01277654, -0.05832949,
                   -0.0457442, -0.02661792, -0.01272745, -0.03735075],
                  [-0.04824025, 0.1538717, 0.03623179, 0.04438706, -0.01500522, -0.05789964,
                   -0.04704555, -0.02557432, -0.01185577, -0.0376824],
                  [-0.04682701, 0.1497171, 0.04089716, 0.04692833, -0.01090989, -0.0597327,
                   -0.04527134, -0.0279725, -0.009281307, -0.04029392],
                  [-0.05176378, 0.1538084, 0.04625426, 0.04769522, -0.01285996, -0.06228339,
                   -0.04931965, -0.02784229, -0.00935936, -0.04456574],
                  [-0.04394198, 0.1577999, 0.03044163, 0.04413763, -0.0180838, -0.05856511,
                   -0.04395874, -0.02359466, -0.0108832, -0.03570355],
                  [-0.04989328, 0.1467535, 0.040537, 0.04441449, -0.008625209, -0.06126183,
                   -0.0455163, -0.02668602, -0.006345391, -0.03915347]],
  'mask': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
  'prediction': [1, 1, 1, 1, 1, 1],
  'prediction_debiased': [1, 1, 1, 1, 1, 1],
  'targets': [[0.09531045, 0.1163475, 0.1108336, 0.1072228, 0.08950739, 0.08786541, 0.09444974,
               0.09854985, 0.09161221, 0.108301],
              [0.1005273, 0.1128116, 0.1013735, 0.1047452, 0.09136917, 0.09241936, 0.09716895,
               0.09983736, 0.09083637, 0.1089111],
              [0.09776517, 0.1066192, 0.1107665, 0.1051006, 0.09253498, 0.09485968, 0.09659687,
               0.09598969, 0.0901309, 0.1096366],
              [0.0955679, 0.1092181, 0.1193028, 0.1067405, 0.09226967, 0.09426907, 0.09296626,
               0.09288794, 0.08907869, 0.107699],
              [0.09362882, 0.1099116, 0.1103347, 0.1026567, 0.09336632, 0.09319955, 0.09790251,
               0.09413598, 0.0932881, 0.1115756],
              [0.09503609, 0.1097093, 0.1128063, 0.1063537, 0.08970307, 0.09420788, 0.09654706,
               0.09327143, 0.09202942, 0.1103358],
              [0.09864856, 0.102697, 0.1169247, 0.107758, 0.09172139, 0.09333848, 0.09773879,
               0.09285505, 0.09228006, 0.1060378],
              [0.09318668, 0.1086401, 0.1163183, 0.1090598, 0.09316888, 0.09178712, 0.09246665,
               0.09550301, 0.09550928, 0.1043603]]},
 {'bias': [1.450015, 0.9504141, -0.06800409, 0.9291437, -0.748032, -0.6028426, -0.5781059,
           -0.5759862, -0.7169715, -0.113643],
  'epoch': 101,
  'eval_bias': [0.3625849, 0.2685083, 0.0208299, 0.321502, -0.2643414, -0.07294487, -0.08811589,
                -0.1388209, -0.1138462, -0.00974898],
  'eval_logits': [[0.1053112, 0.1132122, -0.05244104, 0.02180481, -0.004551649, -0.05553416,
                   -0.003834248, -0.008841157, -0.0306962, -0.08161117],
                  [0.1081022, 0.117801, -0.05544058, 0.02251714, -0.006640166, -0.05642565,
                   -0.004771858, -0.008007437, -0.03015256, -0.08304513],
                  [0.1078556, 0.107771, -0.04801863, 0.02466843, -0.001713395, -0.05752053,
                   -0.0008310676, -0.008585542, -0.02712774, -0.08552775],
                  [0.107706, 0.1098385, -0.0467769, 0.0214628, -0.003775686, -0.0586056,
                   -0.00287468, -0.007439405, -0.02754071, -0.09125261],
                  [0.1127325, 0.1201472, -0.06031778, 0.0249593, -0.009572953, -0.05736134,
                   -0.003240831, -0.007062301, -0.02965119, -0.0827017],
                  [0.09854046, 0.1008797, -0.04454992, 0.02208948, 0.002065063, -0.05796511,
                   -0.001744471, -0.006414652, -0.02299288, -0.08254743]],
  'mask': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
  'prediction': [0, 0, 0, 0, 0, 0],
  'prediction_debiased': [1, 1, 0, 1, 1, 1],
  'targets': [[0.1258256, 0.1129214, 0.1050685, 0.1066893, 0.09211989, 0.09200725, 0.09198146,
               0.09297339, 0.08635688, 0.09405635],
              [0.1357232, 0.1290691, 0.09071869, 0.1184991, 0.08317264, 0.08333258, 0.08654328,
               0.09000193, 0.08444437, 0.09849509],
              [0.1277847, 0.1203977, 0.09516619, 0.1109803, 0.08702708, 0.08834321, 0.09234231,
               0.09162329, 0.08527184, 0.1010633],
              [0.128702, 0.1180946, 0.1018055, 0.1070745, 0.08721688, 0.08975253, 0.09214149,
               0.09153441, 0.08681275, 0.09686531],
              [0.1287146, 0.1114601, 0.1012544, 0.1126558, 0.08999027, 0.09093653, 0.08977821,
               0.09183782, 0.08742476, 0.09594746],
              [0.1286012, 0.1154985, 0.09243584, 0.1169737, 0.08634067, 0.08696662, 0.09004027,
               0.0934845, 0.09022202, 0.0994367],
              [0.1213107, 0.1020379, 0.1065572, 0.107859, 0.09564284, 0.09026349, 0.09632573,
               0.09261648, 0.08778713, 0.09959952],
              [0.1225681, 0.1194308, 0.09601199, 0.1131887, 0.08898067, 0.08769657, 0.09110226,
               0.09130527, 0.08750734, 0.1022083]]},
 {'bias': [0.04133489, 0.1655738, 0.7055889, 0.220862, -0.847137, -0.7117998, -0.7000868,
           -0.6862196, 0.1771329, 1.628648],
  'epoch': 250,
  'eval_bias': [-0.00189282, 0.04273625, 0.2131616, 0.1412289, -0.2490219, -0.0617689,
                -0.09324759, -0.1479021, 0.1580957, 0.3298528],
  'eval_logits': [[0.04851247, 0.06766234, 0.02636635, 0.01395622, -0.008516371, -0.05598299,
                   -0.02242133, -0.01472695, 0.0521967, -0.05231369],
                  [0.04627415, 0.07008005, 0.02825192, 0.01202387, -0.01091415, -0.05804498,
                   -0.02497506, -0.01513846, 0.05925657, -0.05220446],
                  [0.05156636, 0.0638425, 0.03195377, 0.01796693, -0.005570054, -0.06079328,
                   -0.02124262, -0.01497959, 0.05882673, -0.05948928],
                  [0.05273959, 0.06639836, 0.03508539, 0.01562531, -0.008597255, -0.06320179,
                   -0.02544509, -0.01483454, 0.06083648, -0.06390253],
                  [0.04857726, 0.06914113, 0.02508657, 0.01416047, -0.01271611, -0.05884348,
                   -0.02311641, -0.01306453, 0.0639887, -0.05118945],
                  [0.04823934, 0.06140789, 0.03167531, 0.01671925, -0.002117187, -0.05968162,
                   -0.02169524, -0.01281399, 0.0588396, -0.06086835]],
  'mask': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
  'prediction': [9, 9, 9, 9, 9, 9],
  'prediction_debiased': [1, 1, 1, 1, 1, 1],
  'targets': [[0.1003705, 0.1001464, 0.1156679, 0.09600094, 0.0929278, 0.08928609, 0.08951029,
               0.08635684, 0.09302968, 0.1367037],
              [0.1051503, 0.1019942, 0.113849, 0.09585445, 0.09016253, 0.09118877, 0.09148694,
               0.09039343, 0.1014118, 0.1185087],
              [0.1013577, 0.09788764, 0.1136262, 0.0999159, 0.08845896, 0.08885176, 0.08974057,
               0.09084786, 0.102301, 0.1270124],
              [0.0993502, 0.1054027, 0.1098582, 0.09673565, 0.08683506, 0.08856233, 0.08879095,
               0.08957282, 0.1059967, 0.1288954],
              [0.0957009, 0.1062216, 0.1029558, 0.09799346, 0.08734651, 0.08601912, 0.09185498,
               0.09341253, 0.1076786, 0.1308164],
              [0.1027839, 0.09925907, 0.1077493, 0.1023339, 0.09013628, 0.08630729, 0.09201758,
               0.08962561, 0.09673281, 0.1330543],
              [0.1013047, 0.1034666, 0.1150183, 0.09670566, 0.08772213, 0.09053487, 0.08875157,
               0.08599509, 0.09663092, 0.1338702],
              [0.09884852, 0.1099565, 0.1047244, 0.09688278, 0.08666832, 0.08574318, 0.09218926,
               0.09392327, 0.1063633, 0.1247004]]}]


def _fixture():
    """The seeded network, data and optimizer of the reference run."""
    torch.manual_seed(0)
    net = Network(SmallCNN(K, in_channels=3), {}).train()
    gen = torch.Generator().manual_seed(1)
    x_lb = torch.randn(STEPS, B, 3, 32, 32, generator=gen)
    y_lb = torch.randint(0, K, (STEPS, B), generator=gen)
    x_u = torch.randn(STEPS, MU * B, 3, 32, 32, generator=gen)
    x_test = torch.randn(6, 3, 32, 32, generator=gen)
    return net, x_lb, y_lb, x_u, x_test, torch.optim.SGD(net.parameters(), lr=0.5)


def _algorithm(**overrides):
    cls = get_algorithm("cdmad")
    algo = cls(cls.Config(epoch_iters=EPOCH_ITERS, **overrides), K, 64, torch.arange(20) % K)
    algo.record_input_shape(torch.zeros(1, 3, 32, 32))
    return algo


def _close(got, want, atol=1e-5):
    return torch.allclose(torch.as_tensor(got).float(), torch.tensor(want), atol=atol, rtol=1e-5)


def _replay(algo, check):
    """The reference run's four steps through imbssl's functions; ``check(step, ref, values)``."""
    net, x_lb, y_lb, x_u, x_test, opt = _fixture()
    for step, ref in enumerate(REF):
        # train mode, the solid image alone in its batch, before the weak forward (official)
        bias = measure_bias(net, algo.solid_image("cpu"))
        with torch.no_grad():
            out = net(x_u[step])
        targets, mask, pseudo, _ = algo.pseudo_targets(out.logits, out.features, bias,
                                                       ref["epoch"] * EPOCH_ITERS)
        net.eval()
        with torch.no_grad():
            predict = algo.eval_predictor(net)
            eval_logits = predict(net(x_test))
        net.train()
        check(step, ref, {"bias": bias, "targets": targets, "mask": mask, "pseudo": pseudo,
                          "eval_logits": eval_logits})
        loss = F.cross_entropy(net(x_lb[step]).logits, y_lb[step])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_bias_pseudo_labels_and_evaluation_equal_the_official_over_four_steps():
    seen = []

    def check(step, ref, got):
        assert _close(got["bias"], ref["bias"]), (step, got["bias"], ref["bias"])
        assert _close(got["targets"], ref["targets"]), step
        # official select_mask is repeated for its two strong views
        assert got["mask"].tolist() * 2 == ref["mask"], step
        assert got["pseudo"].tolist() == torch.tensor(ref["targets"]).argmax(-1).tolist()
        assert _close(got["eval_logits"], ref["eval_logits"]), step
        assert got["eval_logits"].argmax(-1).tolist() == ref["prediction_debiased"], step
        seen.append(step)

    _replay(_algorithm(), check)
    assert seen == [0, 1, 2, 3]
    # the reference is informative: the bias moves between steps, and debiasing changes labels
    assert not _close(REF[1]["bias"], REF[2]["bias"], atol=1e-3)
    assert REF[3]["prediction"] != REF[3]["prediction_debiased"]


def test_the_reference_tells_debiased_from_raw():
    """Without the debiasing (train and test) imbssl's values differ from the reference, so the
    parity test can fail."""
    mismatches = []

    def check(step, ref, got):
        if ref["epoch"] > 100 and not _close(got["targets"], ref["targets"]):
            mismatches.append(("targets", step))
        if got["eval_logits"].argmax(-1).tolist() != ref["prediction_debiased"]:
            mismatches.append(("prediction", step))

    _replay(_algorithm(debias_after_epochs=1000, debias_eval=False), check)
    assert {kind for kind, _ in mismatches} == {"targets", "prediction"}


def test_debiased_logits_and_solid_image():
    assert torch.equal(solid_image((3, 2, 2), 1.0, "cpu"), torch.ones(1, 3, 2, 2))
    got = debiased_logits(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([1.5, -1.0, 0.0]))
    assert torch.equal(got, torch.tensor([[0.5, 2.0, 0.0]]))
    assert got.argmax(-1).item() == 1  # the raw argmax (class 0) is the biased one


@pytest.mark.parametrize("epoch,debiased", [(100, False), (101, True)])
def test_debiasing_starts_after_epoch_100(epoch, debiased):
    """official ``if epoch > args.debiasstart`` with --debiasstart 100, epochs from 0"""
    algo = _algorithm()
    assert algo.debiasing(epoch * EPOCH_ITERS) == debiased
    assert algo.debiasing(epoch * EPOCH_ITERS + EPOCH_ITERS - 1) == debiased
