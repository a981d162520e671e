"""The public DASO API refuses its misuses before any state changes (issue 32 item 11, issue 28
item 4): non-finite features, out-of-range labels, a half-updating ``observe``, a broadcast
alignment loss, infinite temperatures and weights, ``observe(labels[mask])``, logits passed
as probabilities, semantic labels from empty queues and a loaded state without DASO's
buffers; ``help(DASO)`` documents every constructor argument and marks the engine hooks."""
from __future__ import annotations

import inspect
import math
import pydoc

import pytest
import torch
from torch import nn

from imbssl.errors import UserError
from imbssl.pseudo.daso import DASO, DASOConfig

K, D = 4, 3


def make(**kw) -> DASO:
    args = dict(queue_size=4, warmup_iters=0, dist_window=2)
    args.update(kw)
    return DASO(K, D, **args)


def filled() -> DASO:
    """A DASO with every queue holding a feature and a half-counted m_hat window."""
    d = make()
    d.enqueue(torch.eye(K, D) + 0.1, torch.arange(K))
    d.observe(torch.tensor([0, 1, 1, 2]))
    return d


def snapshot(d: DASO) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.state_dict().items()}


def assert_unchanged(d: DASO, before: dict[str, torch.Tensor]) -> None:
    after = d.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"state changed before the error: {changed}"


# ---------------------------------------------------------------------------- enqueue
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_enqueue_refuses_a_non_finite_row_before_queueing(bad):
    d = filled()
    before = snapshot(d)
    feats = torch.randn(3, D)
    feats[1, 2] = bad
    with pytest.raises(UserError, match=r"enqueue: features has 1 row.*NaN or inf.*row 1"):
        d.enqueue(feats, torch.tensor([0, 1, 2]))
    assert_unchanged(d, before)
    assert torch.isfinite(d.prototypes).all()


@pytest.mark.parametrize("label", [K, -1, 100])
def test_enqueue_refuses_out_of_range_labels(label):
    d = filled()
    before = snapshot(d)
    with pytest.raises(UserError, match=rf"enqueue: labels must be class indices in \[0, {K - 1}\]"):
        d.enqueue(torch.randn(3, D), torch.tensor([0, label, 1]))
    assert_unchanged(d, before)


# ---------------------------------------------------------------------------- observe
@pytest.mark.parametrize("label", [K, -1])
def test_observe_refuses_out_of_range_labels_without_half_updating(label):
    d = filled()
    before = snapshot(d)
    with pytest.raises(UserError, match=r"observe: pseudo_labels must be class indices"):
        d.observe(torch.tensor([0, 1, label, 2]))
    assert_unchanged(d, before)  # today: window_counts already holds the 0 and the 1


def test_observe_refuses_only_the_confident_labels_of_a_blended_batch():
    d = filled()
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1],
                          [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    blended = d.blend(probs, d.semantic_probs(torch.randn(4, D)))
    labels = blended.argmax(dim=-1)
    mask = torch.tensor([True, False, True, False])  # e.g. confidence >= threshold
    before = snapshot(d)
    with pytest.raises(UserError, match=r"observe: got 2 pseudo-labels but the last blend had "
                                        r"4 rows.*not only the confident ones.*labels\[mask\]"):
        d.observe(labels[mask])
    assert_unchanged(d, before)
    d.observe(labels)  # the whole batch is accepted
    assert d.num_observed.item() == 2
    d.observe(labels[:1])  # no blend since the last observe (warm-up): nothing to compare


# ---------------------------------------------------------------------------- blend
def test_blend_refuses_logits_where_probabilities_belong():
    d = filled()
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.1], [0.3, 0.2, -2.0, 1.0]])
    q = d.semantic_probs(torch.randn(2, D))
    with pytest.raises(UserError, match=r"linear_probs must be probabilities.*softmax"):
        d.blend(logits, q)
    with pytest.raises(UserError, match=r"linear_probs must be probabilities.*softmax"):
        d.blend(logits.abs(), q)  # non-negative but rows not summing to 1
    with pytest.raises(UserError, match=r"semantic_probs must be probabilities"):
        d.blend(logits.softmax(-1), d.semantic_logits(torch.randn(2, D)))
    torch.testing.assert_close(d.blend(logits.softmax(-1), q).sum(-1), torch.ones(2))


def test_blend_accepts_bf16_softmax_rows():
    d = filled()
    p = torch.randn(64, K).softmax(-1).to(torch.bfloat16)
    q = d.semantic_probs(torch.randn(64, D)).to(torch.bfloat16)
    assert d.blend(p, q).shape == (64, K)


# ---------------------------------------------------------------------------- semantic_probs
def test_semantic_probs_refuses_empty_queues_instead_of_a_uniform_answer():
    d = make()
    with pytest.raises(UserError, match=r"every class queue is empty.*uniform.*daso.enqueue"):
        d.semantic_probs(torch.randn(2, D))
    with pytest.raises(UserError, match=r"every class queue is empty"):
        d.alignment_loss(torch.randn(2, D), torch.randn(2, D))
    d.enqueue(torch.randn(1, D), torch.tensor([2]))  # one class queued: the official zeros
    assert d.semantic_probs(torch.randn(2, D)).shape == (2, K)


def test_semantic_probs_refuses_non_finite_features():
    d = filled()
    with pytest.raises(UserError, match="NaN or inf"):
        d.semantic_probs(torch.tensor([[0.0, float("nan"), 1.0]]))


# ---------------------------------------------------------------------------- alignment loss
def test_alignment_loss_refuses_to_broadcast_one_row_against_eight():
    d = filled()
    with pytest.raises(ValueError, match=r"same images \(same shape\), got \(1, 3\) and \(8, 3\)"):
        d.alignment_loss(torch.randn(1, D), torch.randn(8, D))
    with pytest.raises(ValueError, match=r"same shape"):
        d.alignment_loss(torch.randn(8, D), torch.randn(1, D))


# ---------------------------------------------------------------------------- constructor
@pytest.mark.parametrize(("name", "value"), [
    ("proto_temperature", math.inf), ("dist_temperature", math.inf),
    ("align_weight", math.inf), ("proto_temperature", math.nan), ("align_weight", math.nan),
    ("fixed_weight", math.inf)])
def test_constructor_refuses_infinite_temperatures_and_weights(name, value):
    with pytest.raises(UserError, match=rf"DASO: {name} must be"):
        make(**{name: value})


# ---------------------------------------------------------------------------- checkpoints
def test_loading_a_state_without_daso_refuses_and_names_the_fix():
    d = filled()
    fix = r"warm-up \(0 steps\) runs again; save daso.state_dict\(\) in your checkpoint"
    with pytest.warns(UserWarning, match=fix), pytest.raises(RuntimeError, match="Missing"):
        d.load_state_dict({})
    host = nn.ModuleDict({"net": nn.Linear(2, 2), "daso": make()})
    state = {k: v for k, v in host.state_dict().items() if not k.startswith("daso.")}
    with pytest.warns(UserWarning, match=r"DASO's state \(queue, .*num_observed\) is missing"):
        host.load_state_dict(state, strict=False)  # a user's model checkpoint without DASO


def test_loading_a_complete_state_is_silent():
    d = filled()
    fresh = make()
    with warnings_as_errors():
        fresh.load_state_dict(d.state_dict())
    assert fresh.num_observed.item() == 1


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------- help(DASO)
def test_help_documents_every_constructor_argument():
    doc = " ".join(DASO.__doc__.split())
    params = [p for p in inspect.signature(DASO.__init__).parameters if p != "self"]
    assert len(params) >= 11
    for name in params:
        assert f"* ``{name}``:" in doc, name


def test_help_marks_every_engine_hook():
    hooks = ("from_config", "needs_labeled_features", "begin_step", "observe_validation",
             "update_labeled", "refine", "extra_loss", "pseudo_logs")
    doc = " ".join(DASO.__doc__.split())
    sentence = doc[doc.index("``from_config``"):]
    assert "engine hooks, not for user code" in sentence
    for name in hooks:
        assert f"``{name}``" in sentence, name
        attr = inspect.getattr_static(DASO, name)
        attr = getattr(attr, "__func__", getattr(attr, "fget", attr))
        assert attr.__doc__.startswith("Engine hook"), name
    text = pydoc.render_doc(DASO, renderer=pydoc.plaintext)
    for name in ("begin_step", "observe_validation", "from_config", "needs_labeled_features"):
        after = text.split(name, 2)[-1][:200]
        assert "Engine hook" in after, name


# ---------------------------------------------------------------------------- engine path
def test_engine_built_daso_skips_the_value_checks_and_never_syncs(monkeypatch):
    d = DASO.from_config(DASOConfig(queue_size=2, warmup_iters=0, dist_window=2), K, D)
    assert not d.check_inputs

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    d.enqueue(torch.randn(5, D), torch.tensor([0, 1, 1, 3, 2]))
    q = d.semantic_probs(torch.randn(6, D))
    p = d.blend(torch.rand(6, K).softmax(1), q)
    d.observe(p.argmax(1))
    d.alignment_loss(torch.randn(6, D), torch.randn(6, D))
