"""DARP (Kim et al., NeurIPS 2020): the refined pseudo-labels meet the target class counts
within the solver's tolerance and keep each row a distribution; the refiner's schedule."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from imbssl.pseudo import build_refiner
from imbssl.pseudo.darp import (
    DARP,
    DARPConfig,
    confident_rescale,
    darp_solve,
    estimate_distribution,
    row_entropy,
)

NEWTON_TOL = 0.1  # official optimize.newton(tol=1e-1): class sums within a fraction of an image


def hand_made():
    """6 images, 3 classes; the classifier favours class 0 (head), the target wants 2/2/2."""
    probs = torch.tensor([[0.90, 0.05, 0.05], [0.80, 0.15, 0.05], [0.70, 0.20, 0.10],
                          [0.60, 0.30, 0.10], [0.50, 0.20, 0.30], [0.40, 0.25, 0.35]])
    return probs, torch.tensor([2.0, 2.0, 2.0])


def test_solution_meets_the_marginal_and_keeps_row_mass():
    probs, target = hand_made()
    assert probs.sum(0).tolist() == pytest.approx([3.9, 1.15, 0.95])  # far from 2/2/2
    m = darp_solve(probs.double(), target, num_iters=10)
    assert torch.allclose(m.sum(1), torch.ones(6, dtype=m.dtype), atol=1e-9)  # row mass
    assert (m >= 0).all()
    assert torch.allclose(m.sum(0), target.double(), atol=NEWTON_TOL)  # the target marginal
    # the most class-0-confident image keeps class 0, the least confident one leaves it
    assert int(m[0].argmax()) == 0 and int(m[5].argmax()) != 0


def test_kkt_form_of_the_solution():
    """Stationarity of Eq. 4: log M_ik = log P_ik + (-1 - lambda_i - nu_k) / w_i, so
    w_i (log M_ik - log P_ik) - w_i (log M_i0 - log P_i0) depends on k only."""
    probs, target = hand_made()
    m = darp_solve(probs.double(), target)
    w = 1.0 / row_entropy(probs.double())
    d = w[:, None] * (m.log() - probs.double().log())
    d = d - d[:, :1]
    assert torch.allclose(d, d[:1].expand_as(d), atol=1e-6)


def test_already_aligned_rows_are_kept():
    probs = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    m = darp_solve(probs, probs.sum(0))
    assert torch.allclose(m, probs, atol=1e-6)


def test_confident_rescale_hand_computed():
    probs, target = hand_made()
    out = confident_rescale(probs.double(), torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64),
                            alpha=1.0)
    # class 0: top-1 is image 0 (p .9) -> weight (1 + 1e-6) / (.9 + 1e-6); class 1: image 3
    # (.3); class 2: int(.5) = 0 images. Image 0 row: (.9 w0 + 1e-6, 1e-6, 1e-6) normalised.
    w0 = (1 + 1e-6) / (0.9 + 1e-6)
    row0 = torch.tensor([0.9 * w0 + 1e-6, 1e-6, 1e-6], dtype=torch.float64)
    assert torch.allclose(out[0], row0 / row0.sum())
    assert int(out[3].argmax()) == 1
    assert torch.allclose(out[1], torch.full((3,), 1 / 3, dtype=torch.float64))  # in no top set
    assert torch.allclose(out.sum(1), torch.ones(6, dtype=torch.float64))
    del target


def test_estimate_inverts_the_confusion():
    true_counts = torch.tensor([60.0, 30.0, 10.0], dtype=torch.float64)
    conf = torch.tensor([[8, 1, 1], [2, 7, 1], [0, 1, 9]], dtype=torch.float64)  # rows: true
    p_pred_given_true = conf / conf.sum(1, keepdim=True)
    predicted = p_pred_given_true.t() @ true_counts  # what a classifier with conf would predict
    q, cond = estimate_distribution(conf, predicted)
    assert torch.allclose(q, true_counts) and 1 <= cond < 100


def batch(idx):
    return SimpleNamespace(idx_ulb=torch.as_tensor(idx))


def state(step, total):
    return SimpleNamespace(step=step, total_steps=total)


def test_refiner_schedule_warmup_then_refines_every_per_iters():
    probs, _ = hand_made()
    darp = DARP(3, 6, [2, 2, 2], warmup_ratio=0.5, per_iters=2)
    solves = []
    original = darp.solve
    darp.solve = lambda: (solves.append(darp._step + 1), original())[1]
    for step in range(8):
        darp.begin_step(batch([0, 1, 2, 3, 4, 5]), state(step, 8))
        out = darp.refine(probs, torch.zeros(6, 4), step)
        if step < 4:  # steps 1..4 <= int(8 * 0.5): warm-up, the input comes back
            assert out is probs
        else:
            assert torch.allclose(out.sum(0), torch.tensor([2.0, 2.0, 2.0]), atol=NEWTON_TOL)
    # official counter (step + 1): multiples of per_iters after the warm-up; the step between
    # (count 5) reads the initial uniform rows, as the official pseudo_refine
    assert solves == [6, 8]
    assert [s for s in range(20) if darp.solves_at(s, 20)] == [11, 13, 15, 17, 19]
    # per-image state: a subset of the images reads its stored refined rows
    darp.begin_step(batch([5, 0]), state(8, 8))
    out = darp.refine(probs[[5, 0]], torch.zeros(2, 4), 8)
    assert torch.allclose(out, darp.pseudo_refine[[5, 0]])


def test_target_from_labeled_counts_and_estimate_accumulates():
    darp = build_refiner(DARPConfig(target="estimate"), 3, 8, num_unlabeled=100,
                         labeled_counts=[30, 15, 5])
    assert torch.allclose(darp.target_counts(), torch.tensor([60.0, 30.0, 10.0],
                                                             dtype=torch.float64))
    # the stored predictions: 50 / 30 / 20 images predicted per class; an identity confusion
    darp.pseudo_orig.copy_(torch.eye(3)[torch.tensor([0] * 50 + [1] * 30 + [2] * 20)])
    darp.seen.fill_(True)
    darp.observe_validation(torch.eye(3) * 10)
    assert int(darp.estimate_count) == 1
    assert torch.allclose(darp.target_counts(), torch.tensor([50.0, 30.0, 20.0],
                                                             dtype=torch.float64))
    darp.observe_validation(torch.ones(3, 3))  # singular: rejected, the estimate is kept
    assert int(darp.estimate_count) == 1


def test_bad_target_is_a_value_error():
    with pytest.raises(ValueError, match="target"):
        DARP(3, 6, [1, 1, 1], target="oracle")
    assert math.isclose(DARPConfig().warmup_ratio, 0.4)


def _tiny_runs():
    """tests/algorithms/tiny_runs.py (the shared tiny digits-LT run)."""
    path = Path(__file__).resolve().parents[1] / "algorithms" / "tiny_runs.py"
    spec = importlib.util.spec_from_file_location("tiny_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overrides", [
    ["algorithm=fixmatch", "pseudo=darp"],  # FixMatch w/ DARP
    ["algorithm=mixmatch", "pseudo=darp"],
    ["algorithm=remixmatch", "pseudo=darp"],
    ["algorithm=fixmatch", "pseudo=darp", "pseudo.target=estimate",
     "dataset.num_valid_per_class=5", "dataset.gamma_u=1"],  # imbssl's in-run estimate
], ids=["fixmatch_darp", "mixmatch_darp", "remixmatch_darp", "fixmatch_darp_in_run_estimate"])
def test_digits_runs_with_darp(tmp_path, overrides):
    _tiny_runs().tiny_run(tmp_path / "run", *overrides, "pseudo.warmup_ratio=0.25", "pseudo.per_iters=1")


def test_estimate_without_validation_set_is_a_user_error(tmp_path):
    from imbssl.cli import main

    assert main(["train", *_tiny_runs().TINY, f"run_dir={tmp_path / 'r'}", "pseudo=darp",
                 "pseudo.target=estimate"]) == 2


def test_darp_estim_in_two_stages_as_the_official_code(tmp_path):
    """Stage 1 (algorithm=darp_estim, labeled only) writes RUN/darp_estim.npyz; stage 2
    (pseudo=darp_estim) loads it by path and scales it to the unlabeled set."""
    import numpy as np

    from imbssl.cli import main

    tiny = _tiny_runs().TINY
    est_run = tmp_path / "estim"
    mismatched = ["dataset.num_valid_per_class=5", "dataset.gamma_u=1"]
    assert main(["train", *tiny, f"run_dir={est_run}", "algorithm=darp_estim", "pseudo=none",
                 *mismatched, "algorithm.thresh_cond=1e12", "trainer.iterations=30",
                 "trainer.eval_interval=10", "trainer.log_interval=10",
                 "trainer.checkpoint_interval=30"]) == 0
    estimate = est_run / "darp_estim.npyz"
    assert estimate.is_file()
    q = np.load(estimate)
    assert q.shape == (10,) and np.isfinite(q).all() and (q >= 0).all()
    ssl = tmp_path / "ssl"
    rows = _tiny_runs().tiny_run(ssl, "algorithm=fixmatch", "pseudo=darp_estim",
                                 f"pseudo.estimate_file={estimate}", *mismatched,
                                 "pseudo.warmup_ratio=0.25", "pseudo.per_iters=1")
    assert rows


def test_official_npyz_estimates_load_and_scale(tmp_path):
    """The official darp_estim/*.npyz files are .npy files: np.save to an open file."""
    import numpy as np

    from imbssl.pseudo.darp import load_estimate

    path = tmp_path / "cifar10_l_1500_100_ul_3000_1_estim.npyz"
    with open(path, "wb") as fh:
        np.save(fh, np.array([3.0, 1.0, 0.0, 4.0], dtype=np.float32))
    target = load_estimate(str(path), 4, 80)
    assert target.tolist() == [30.0, 10.0, 0.0, 40.0]  # N_u * q / sum(q)
    darp = DARP(4, 80, [1, 1, 1, 1], target="file", estimate_file=str(path))
    assert darp.target_counts().tolist() == [30.0, 10.0, 0.0, 40.0]
    with pytest.raises(ValueError, match="estimate_file"):
        DARP(4, 80, [1, 1, 1, 1], target="file")
    with pytest.raises(ValueError, match="hold 5 finite non-negative"):
        load_estimate(str(path), 5, 80)


def test_estimation_run_without_validation_set_exits_2(tmp_path):
    from imbssl.cli import main

    assert main(["train", *_tiny_runs().TINY, f"run_dir={tmp_path / 'r'}",
                 "algorithm=darp_estim", "pseudo=none"]) == 2
    assert not (tmp_path / "r").exists()


def test_stage_two_without_the_estimate_file_exits_2(tmp_path):
    from imbssl.cli import main

    assert main(["train", *_tiny_runs().TINY, f"run_dir={tmp_path / 'r'}", "pseudo=darp_estim",
                 f"pseudo.estimate_file={tmp_path / 'missing.npyz'}"]) == 2
