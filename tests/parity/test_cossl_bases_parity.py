"""CoSSL on MixMatch and ReMixMatch: parity of the co-learning step's representation module
(the teacher head's guess on the EMA encoder's features, MixUp, the losses, the update) with
the official code, over three steps.

Reference values: computed once by running ``train`` of ``train_cifar_mix_cossl.py`` and of
``train_cifar_remix_cossl.py`` (``--align``) from github.com/YUE-FAN/CoSSL (commit
9c7b8401b912bf266297c2763300892daa9a0495), unmodified, on CPU (``.cuda()`` an identity, a
stand-in progress bar, loaders yielding the tensors below), with the small network below
(``TinyNet``: no batch norm, so the official interleaved passes equal one pass), the official
co-learning optimizers (Adam lr 0.002 with weight decay 0.02 lr; ``WeightEMA`` with decay 0.5,
MixMatch's with its parameter decay ``wd=True``), ``val_iteration`` 3, K = 3 classes, batches
of 4, labeled counts (6, 3, 1) and unlabeled (12, 6, 2) (the official ``target_disb``). The
teacher head is held fixed (its optimizer's lr 0): the classifier module is the FixMatch one,
checked in test_cossl_parity.py. The official draws (MixUp lambda' and permutation, the
rotations) are stored below and replayed into imbssl's step; the losses, the guessed labels and
the parameters after each step must match. Tolerance: float32 rounding, and the alignment's
epsilon (official target: labeled counts scaled to the unlabeled set's size, imbssl: the
labeled class frequencies; the 1e-6 beside each gives differences below 1e-5).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from imbssl.algorithms import Batch, StepState
from imbssl.algorithms.cossl import COSSL_HEAD, CoSSLConfig, MixMatchCoSSL, ReMixMatchCoSSL
from imbssl.models.base import ModelOutput

K, D, B, STEPS = 3, 4, 4, 3
COUNTS = (6, 3, 1)
LR, EMA_DECAY = 0.002, 0.5


#: the official run's draws, losses, guessed labels (argmax of the sharpened guess) and the
#: parameters after the three steps (model and EMA), per base
OFFICIAL = {
    'mixmatch': {
        "steps": [
            {'lam': 0.583105906, 'perm': [8, 0, 5, 9, 7, 4, 2, 10, 3, 1, 11, 6], 'pseudo': [2,
             2, 2, 2], 'loss': 1.19278216, 'Lx': 1.15450406, 'Lu': 0.0382780805},
            {'lam': 0.523785399, 'perm': [2, 3, 11, 4, 1, 9, 6, 0, 5, 7, 8, 10], 'pseudo': [2,
             2, 0, 0], 'loss': 2.01777053, 'Lx': 1.83727777, 'Lu': 0.180492744},
            {'lam': 0.875199313, 'perm': [11, 4, 6, 8, 9, 3, 1, 7, 2, 5, 0, 10], 'pseudo': [1,
             2, 1, 2], 'loss': 2.27952886, 'Lx': 2.21348476, 'Lu': 0.0660440773},
        ],
        "model": {
            'conv.weight': [[[[-0.452545166, -0.219698772, -0.190783232], [-0.477449685,
             -0.0254002176, -0.177761376], [-0.288610339, -0.477209955, -0.208432674]],
             [[0.0885638967, -0.235784158, -0.0780336708], [-0.0692441165, 0.503480792,
             0.0658958182], [0.137720138, -0.211699918, -0.350836396]], [[0.210882813,
             0.0607106015, 0.260663599], [0.0743357092, -0.197876364, 0.243123516], [0.33147648,
             -0.0517992601, -0.672611296]]], [[[-0.433319896, 0.0192000251, -0.184572741],
             [-0.238590762, -0.0385523476, 0.564942539], [-0.0208555553, 0.048234567,
             -0.231292769]], [[0.0550614111, 0.00898641255, 0.0411712229], [-0.147405729,
             -0.0380874202, 0.0830289051], [-0.0520571247, -0.0133829536, 0.702331901]],
             [[-0.314230353, 0.470075637, -0.19195132], [-0.281250298, 0.160934538,
             0.0170596652], [-0.134099349, 0.226213828, 0.129678875]]], [[[0.350655735,
             0.605675459, 0.0426518209], [0.282827318, -0.0542949922, -0.191784695],
             [0.463039935, -0.259133428, -0.997046113]], [[-0.230164379, -0.0134637598,
             -0.312815756], [-0.184656948, -0.307447016, -0.0690208972], [-0.00807274971,
             0.496168375, -0.00275661377]], [[-0.209821329, -0.0585880503, -0.297585607],
             [-0.248209104, -0.141526818, -0.171136275], [0.115368798, -0.297611028,
             -0.155096039]]], [[[0.0264121164, -0.199754715, 0.216171041], [-0.433887213,
             -0.153717339, 0.0480908938], [-0.0515144467, 0.0729661733, -0.15406771]],
             [[-0.318183511, 0.213845909, 0.368038028], [0.145856932, 0.279284447, 0.383053988],
             [0.256265521, -0.173895493, 0.37980625]], [[0.250593454, -0.433963329,
             -0.373403162], [0.342137754, 0.47544843, 0.772965372], [-0.0645128638,
             0.00146338542, 0.563728273]]]],
            'conv.bias': [0.0511127487, 0.055385083, -0.0351213887, 0.119209342],
            'output.weight': [[-1.11001587, 0.355973691, -0.775591969, -0.141596973],
             [0.624749184, 1.08809817, 0.0976434946, 1.23323166], [-1.33978891, 0.511600375,
             -0.692649662, -0.167429268]],
            'output.bias': [-0.99442178, -1.64694226, 0.808671653],
            'rot.weight': [[-0.623961389, -0.977178812, 0.874737859, 0.987163007], [0.250437558,
             -0.792937458, 0.523038268, 1.22345889], [-0.403413177, -0.959030032,
             -0.00520707946, -0.0788536817], [-0.389072806, -0.0795908123, 0.760386884,
             -1.0023973]],
            'rot.bias': [0.05541775, 1.27062988, -0.00202226546, -1.09505367],
        },
        "ema": {
            'conv.weight': [[[[-0.435774565, -0.158638209, -0.216625229], [-0.46017012,
             -0.068597205, -0.112480067], [-0.292957246, -0.422838926, -0.21718061]],
             [[0.0902588218, -0.227921426, -0.0772754923], [-0.0229873024, 0.412163585,
             0.0490536876], [0.104103372, -0.241935968, -0.324365973]], [[0.151955336,
             0.0721010417, 0.228447512], [0.0624023601, -0.133982688, 0.245208964],
             [0.306688577, -0.0647959933, -0.584513307]]], [[[-0.275305837, 0.0222540833,
             -0.119334124], [-0.19676806, 0.0321491733, 0.465769738], [0.0505738109,
             0.0319390446, -0.212379068]], [[0.000194087625, 0.00753050111, 0.0277762711],
             [-0.154990226, 0.0106444154, 0.0893651992], [-0.0895052254, -0.039127171,
             0.580218136]], [[-0.30718714, 0.374954492, -0.171739817], [-0.284362555,
             0.152518585, -0.0453007333], [-0.0480528735, 0.199467763, 0.172811598]]],
             [[[0.284745574, 0.572493076, 0.0656788796], [0.202444941, -0.0694005191,
             -0.184383601], [0.330993235, -0.197620302, -0.901690125]], [[-0.205699876,
             0.031964168, -0.296602905], [-0.215775311, -0.276090205, -0.0920959562],
             [0.0544707328, 0.426271617, 0.0339561328]], [[-0.104428574, -0.0878433436,
             -0.253867358], [-0.222163767, -0.134049892, -0.137145862], [0.108120464,
             -0.180076331, -0.103714913]]], [[[0.0268346649, -0.177017018, 0.220180273],
             [-0.358538866, -0.163581729, 0.0546455607], [-0.0383763872, 0.143070132,
             -0.0946053639]], [[-0.276726007, 0.230131865, 0.319226682], [0.174838051,
             0.150618434, 0.338873446], [0.245363101, -0.15844056, 0.355589151]], [[0.245399415,
             -0.378706574, -0.344109505], [0.317462206, 0.394916534, 0.652949214],
             [-0.0991917104, 0.0100640487, 0.465295166]]]],
            'conv.bias': [0.0333852731, 0.0352441892, -0.0237168148, 0.110042259],
            'output.weight': [[-1.07698524, 0.428079009, -0.943128467, -0.121901363],
             [0.607364893, 1.11408687, 0.197174728, 1.04887378], [-0.930604875, 0.402968824,
             -0.737966776, -0.274094552]],
            'output.bias': [-0.702317476, -1.34160852, 0.64946264],
            'rot.weight': [[-0.478413969, -1.04854131, 0.846133709, 0.721552968], [0.306311637,
             -0.751959324, 0.517649293, 1.03456855], [-0.489432871, -0.711410522, 0.0218540393,
             -0.0651744753], [-0.302651405, -0.0804908425, 0.602096319, -1.03100359]],
            'rot.bias': [0.143158019, 0.951738238, -0.0576713756, -0.950625181],
        },
    },
    'remixmatch': {
        "steps": [
            {'lam': 0.583105906, 'perm': [3, 10, 15, 2, 5, 13, 7, 9, 12, 14, 6, 8, 11, 4, 1, 0],
             'pseudo': [2, 0, 0, 0], 'rot': [0, 3, 1, 0], 'loss': 6.1955986, 'Lx': 1.1398412,
             'Lu': 1.9196291, 'Lr': 2.58559155, 'Le': 1.76703644},
            {'lam': 0.523785399, 'perm': [14, 15, 13, 5, 9, 0, 6, 8, 12, 2, 10, 11, 4, 3, 1, 7],
             'pseudo': [0, 0, 0, 0], 'rot': [1, 2, 3, 3], 'loss': 8.53426361, 'Lx': 2.71100783,
             'Lu': 2.32209706, 'Lr': 2.5701561, 'Le': 2.11006379},
            {'lam': 0.875199313, 'perm': [8, 5, 15, 14, 11, 9, 0, 3, 6, 13, 2, 12, 10, 4, 1, 7],
             'pseudo': [1, 2, 1, 2], 'rot': [3, 0, 2, 3], 'loss': 6.38441133, 'Lx': 2.53472948,
             'Lu': 1.35383987, 'Lr': 2.32716179, 'Le': 1.31068218},
        ],
        "model": {
            'conv.weight': [[[[-0.45245859, -0.219731554, -0.190810993], [-0.477593511,
             -0.0246370677, -0.177306399], [-0.288645446, -0.477416217, -0.208236486]],
             [[0.0925249457, -0.231994003, -0.0741824955], [-0.0653522611, 0.507732689,
             0.069852449], [0.141689107, -0.207931951, -0.347146004]], [[0.210397005,
             0.0602150373, 0.260219634], [0.0738206133, -0.19853805, 0.242668301], [0.33106786,
             -0.0523786172, -0.673520088]]], [[[-0.42797941, 0.0242684595, -0.179387614],
             [-0.233478665, -0.0335674323, 0.569674969], [-0.0157106705, 0.053244181,
             -0.226102173]], [[0.0652194321, 0.0191892069, 0.0514310524], [-0.137325406,
             -0.0278911125, 0.0933546275], [-0.0419207178, -0.00318183051, 0.712935507]],
             [[-0.313870788, 0.470114619, -0.191810086], [-0.280966818, 0.161010221,
             0.017140381], [-0.133744732, 0.226204798, 0.129718736]]], [[[0.355276406,
             0.610364199, 0.0469315797], [0.28731522, -0.0500801392, -0.187676847],
             [0.467502236, -0.255161047, -0.99364543]], [[-0.228460431, -0.0118552204,
             -0.311038166], [-0.182830915, -0.305583894, -0.0673154444], [-0.00642480655,
             0.497621149, -0.00114581827]], [[-0.214950025, -0.0596907176, -0.302704126],
             [-0.253196448, -0.14245303, -0.172192976], [0.114271142, -0.298739314,
             -0.156181082]]], [[[0.0357654616, -0.19035688, 0.225363716], [-0.424493521,
             -0.144402385, 0.0573593676], [-0.0421711728, 0.082239978, -0.144707054]],
             [[-0.317647457, 0.218928948, 0.373553872], [0.150813416, 0.284399688, 0.388646871],
             [0.261443049, -0.16920267, 0.385351539]], [[0.244983196, -0.440740705,
             -0.379941404], [0.336585015, 0.469962478, 0.767936766], [-0.0706795752,
             -0.00472631585, 0.558416486]]]],
            'conv.bias': [0.051249221, 0.051738508, -0.0433264375, 0.11240381],
            'output.weight': [[-1.10912478, 0.352262139, -0.775994658, -0.141306549],
             [0.621231556, 1.08758497, 0.09789671, 1.23302162], [-1.34570432, 0.512049854,
             -0.69251591, -0.167489275]],
            'output.bias': [-0.994269133, -1.64850378, 0.804223716],
            'rot.weight': [[-0.618493974, -0.973756552, 0.871631682, 0.987522662], [0.247903168,
             -0.798670828, 0.528669417, 1.21796334], [-0.409341484, -0.959928989,
             -0.00130397978, -0.0786581933], [-0.38825351, -0.0736895427, 0.754941821,
             -0.996907175]],
            'rot.bias': [0.0587427765, 1.26488793, -0.00449081929, -1.08931136],
        },
        "ema": {
            'conv.weight': [[[[-0.435758173, -0.158747241, -0.216731489], [-0.460343242,
             -0.0681338236, -0.112238996], [-0.293060392, -0.423044443, -0.21712099]],
             [[0.0937896818, -0.224470913, -0.0737961382], [-0.019484954, 0.415870577,
             0.0525977276], [0.107643068, -0.238498002, -0.320966303]], [[0.151611507,
             0.0717591569, 0.228133351], [0.0620451942, -0.134423882, 0.244887128],
             [0.306391835, -0.0651877671, -0.585101366]]], [[[-0.271858692, 0.0255189445,
             -0.115984686], [-0.193460852, 0.0353745222, 0.468806654], [0.0538885221, 0.0351668,
             -0.209023744]], [[0.00763532892, 0.0149948196, 0.0352782831], [-0.147598252,
             0.0181009434, 0.0969012678], [-0.0820800811, -0.0316650644, 0.587914705]],
             [[-0.306563944, 0.37533167, -0.171259984], [-0.283798575, 0.152921036,
             -0.0448694862], [-0.047433544, 0.199832022, 0.173221916]]], [[[0.287752807,
             0.575543523, 0.0684859008], [0.205374554, -0.0666351318, -0.181681365],
             [0.333904684, -0.195002481, -0.89943105]], [[-0.204538748, 0.0330537781,
             -0.295392066], [-0.214534119, -0.274820149, -0.0909398273], [0.0555890612,
             0.427244067, 0.0350454897]], [[-0.108667947, -0.0885157436, -0.258087754],
             [-0.226310626, -0.134597242, -0.13777256], [0.107463837, -0.18075487,
             -0.104343891]]], [[[0.0339563005, -0.169862002, 0.227238536], [-0.351386517,
             -0.156469613, 0.0617462508], [-0.0312563702, 0.150155202, -0.0874500126]],
             [[-0.276361227, 0.234346181, 0.323724508], [0.178969458, 0.154850826, 0.343420953],
             [0.249638066, -0.154474974, 0.360106826]], [[0.240794599, -0.384062409,
             -0.349306285], [0.312887907, 0.390386909, 0.648729265], [-0.104168847,
             0.00507687312, 0.460885286]]]],
            'conv.bias': [0.0334463865, 0.0328430608, -0.0299986079, 0.104637146],
            'output.weight': [[-1.07629943, 0.425670117, -0.94336319, -0.121717036], [0.605012,
             1.11379087, 0.197237521, 1.04881334], [-0.935281456, 0.402222633, -0.737853646,
             -0.27412504]],
            'output.bias': [-0.702164829, -1.34259009, 0.645626485],
            'rot.weight': [[-0.474497467, -1.04561758, 0.843598127, 0.722361803], [0.304261267,
             -0.756055713, 0.521653771, 1.030568], [-0.493632376, -0.711418808, 0.0249537937,
             -0.0646464452], [-0.301647961, -0.0762960315, 0.59813571, -1.02701569]],
            'rot.bias': [0.145724326, 0.947622061, -0.0597622171, -0.946513593],
        },
    },
}


def initial_weights(seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights of an encoder (conv 3 -> D), its classifier, rotation head and a teacher."""
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(D, 3, 3, 3, generator=g) * 0.3,
            "conv.bias": torch.randn(D, generator=g) * 0.1,
            "output.weight": torch.randn(K, D, generator=g), "output.bias": torch.randn(K, generator=g),
            "rot.weight": torch.randn(4, D, generator=g), "rot.bias": torch.randn(4, generator=g),
            "teacher.weight": torch.randn(K, D, generator=g) * 2,
            "teacher.bias": torch.randn(K, generator=g)}


def step_inputs(step: int) -> dict[str, torch.Tensor]:
    """The images of co-learning step ``step`` (0-based): labeled x, y and three unlabeled views."""
    g = torch.Generator().manual_seed(100 + step)

    def images():  # noise around a colour of each image (features differ between images)
        return torch.randn(B, 3, 32, 32, generator=g) + 2 * torch.randn(B, 3, 1, 1, generator=g)

    return {"x": images(), "y": torch.randint(K, (B,), generator=g), "u1": images(),
            "u2": images(), "u3": images()}


class TinyNet(nn.Module):
    """Features tanh(conv(x)) averaged over the image; a classifier ``output``; heads."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.conv = nn.Conv2d(3, D, 3, padding=1)
        self.output = nn.Linear(D, K)
        self.heads = nn.ModuleDict({"rotation": nn.Linear(D, 4), COSSL_HEAD: nn.Linear(D, K)})
        with torch.no_grad():
            for name, value in weights.items():
                name = name.replace("rot.", "heads.rotation.").replace(
                    "teacher.", f"heads.{COSSL_HEAD}.")
                self.get_parameter(name).copy_(value)
        self.heads[COSSL_HEAD].requires_grad_(False)  # held fixed, as in the reference run

    def features(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x):
        f = self.features(x)
        return ModelOutput(self.output(f), f)


def _replay(monkeypatch, draws: list[dict]):
    """imbssl's MixUp and rotations draw the official values of each step in turn."""
    import imbssl.algorithms.cossl as cossl
    import imbssl.algorithms.mixmatch as mixmatch

    pos = {"mix": 0, "rot": 0}

    def official_mixup(x, y, alpha):
        d = draws[pos["mix"]]
        pos["mix"] += 1
        lam, perm = d["lam"], torch.tensor(d["perm"])
        return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm], torch.tensor(lam)

    def official_rotations(n, device):
        d = draws[pos["rot"]]
        pos["rot"] += 1
        return torch.tensor(d["rot"])

    monkeypatch.setattr(mixmatch, "mixup", official_mixup)
    monkeypatch.setattr(cossl, "mixup", official_mixup)
    monkeypatch.setattr(cossl, "draw_rotations", official_rotations)


def run_imbssl(base: str, monkeypatch) -> list[dict]:
    """Three co-learning steps of imbssl's learner, stepped by the official optimizers."""
    ref = OFFICIAL[base]
    _replay(monkeypatch, ref["steps"])
    model, ema = TinyNet(initial_weights(1)), TinyNet(initial_weights(2))
    ema.requires_grad_(False)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    cls = MixMatchCoSSL if base == "mixmatch" else ReMixMatchCoSSL
    algo = cls(CoSSLConfig(base=base), K, D, labels)
    algo.co_learning = True
    algo.classifier_loss = lambda head, ema_model: (torch.zeros(()), torch.zeros(()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR, weight_decay=0.02 * LR)  # official co-learning Adam
    out = []
    for step in range(STEPS):
        t = step_inputs(step)
        views = [t["u1"], t["u2"]] + ([t["u3"]] if base == "remixmatch" else [])
        batch = Batch(t["x"], t["y"], torch.arange(B), views, torch.arange(B))
        loss, logs = algo.step(batch, StepState(step, 100, model, ema))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # official WeightEMA (MixMatch's: wd=True, the parameter decay)
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                if p.requires_grad:
                    e.mul_(EMA_DECAY).add_(p * (1 - EMA_DECAY))
                    if base == "mixmatch":
                        p.mul_(1 - 0.02 * LR)
        out.append({"loss": float(loss.detach()), "logs": logs, "model": model, "ema": ema})
    return out


LOSS_KEYS = {"mixmatch": {"loss/labeled": "Lx", "loss/unlabeled": "Lu"},
             "remixmatch": {"loss/labeled": "Lx", "loss/unlabeled": "Lu",
                            "loss/rotation": "Lr", "loss/premixup": "Le"}}


@pytest.mark.parametrize("base", ["mixmatch", "remixmatch"])
def test_co_learning_steps_equal_the_official(base, monkeypatch):
    ref = OFFICIAL[base]
    got = run_imbssl(base, monkeypatch)
    for step, (mine, theirs) in enumerate(zip(got, ref["steps"], strict=True)):
        assert abs(mine["loss"] - theirs["loss"]) < 1e-5, (step, mine["loss"], theirs["loss"])
        for key, name in LOSS_KEYS[base].items():
            assert abs(float(mine["logs"][key]) - theirs[name]) < 1e-5, (step, key)
        assert mine["logs"]["pseudo/final"].tolist() == theirs["pseudo"], step
    final = got[-1]
    for net, key in ((final["model"], "model"), (final["ema"], "ema")):
        for name, value in ref[key].items():
            name = name.replace("rot.", "heads.rotation.")
            assert torch.allclose(net.get_parameter(name).detach(), torch.tensor(value),
                                  atol=1e-5, rtol=0), (key, name)


def test_the_replayed_draws_are_the_official_ones_and_matter(monkeypatch):
    """A step with other MixUp draws gives another loss: the comparison above can fail."""
    ref = OFFICIAL["remixmatch"]
    steps = [dict(s, lam=1.0 - s["lam"] / 2) for s in ref["steps"]]
    monkeypatch.setitem(OFFICIAL, "remixmatch", dict(ref, steps=steps))
    got = run_imbssl("remixmatch", monkeypatch)
    assert abs(got[0]["loss"] - ref["steps"][0]["loss"]) > 1e-4
