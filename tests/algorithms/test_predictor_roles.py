"""The two named prediction roles of the algorithm contract: ``eval_predictor`` (what we
evaluate) and ``label_predictor`` (what labels the unlabeled set, CReST's selection).

With ``logit_adjust=posthoc`` evaluation argmaxes ``f(x) - tau log pi``, while CReST selects on
the raw EMA softmax, as the official DASO ``lib/algorithm/fm_crest.py`` does (there LA (inf) is
only an extra evaluation metric, ``base_algorithm.py`` ``top1_la``)."""
from __future__ import annotations

import torch

from imbssl.engine.trainer import Trainer


@torch.no_grad()
def _ema_logits(trainer: Trainer) -> torch.Tensor:
    model = trainer.ema.model
    model.eval()
    x = trainer._prepare(trainer.data.augmenter.normalize(trainer.data.unlabeled.images))
    return model(x).logits.float()


def test_crest_with_posthoc_la_selects_on_the_unadjusted_ema_softmax(tiny_cfg):
    trainer = Trainer(tiny_cfg("algorithm=crest", "algorithm.logit_adjust=posthoc",
                               "pseudo=none"))
    logits = _ema_logits(trainer)
    raw = torch.softmax(logits, dim=-1)
    adjusted = torch.softmax(logits - trainer.algo.la_offset, dim=-1)
    assert not torch.allclose(raw, adjusted, atol=1e-4)  # the roles differ here
    probs = trainer.unlabeled_probs()
    torch.testing.assert_close(probs, raw)
    # evaluation still takes the adjusted prediction
    out = type("Out", (), {"logits": logits})
    torch.testing.assert_close(trainer.algo.eval_predictor(trainer.ema.model)(out),
                               logits - trainer.algo.la_offset)


def test_label_predictor_defaults_to_the_raw_classifier(tiny_cfg):
    trainer = Trainer(tiny_cfg("algorithm=crest", "pseudo=none"))
    logits = _ema_logits(trainer)
    torch.testing.assert_close(trainer.unlabeled_probs(), torch.softmax(logits, dim=-1))
