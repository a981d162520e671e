"""Why DASO does (or does not) help at the mini protocol's scale: its pseudo-label pipeline on
the whole unlabeled set, from a run's last checkpoint.

    python analysis/diagnose_daso_mini.py DASO_RUN [--baseline FIXMATCH_RUN] [--out FILE.md]

From ``DASO_RUN``'s last checkpoint (online model, EMA model and DASO's queues and m_hat) it
recomputes, for every unlabeled image (not augmented; the network in eval mode, so the numbers
describe the pipeline, not one training batch):

* the linear pseudo-label ``p`` (classifier softmax), the semantic one ``q =
  softmax(cos(z, prototypes) / T_proto)`` (DASO Eq. 2) and the blend ``p' = (1 - v_k) p + v_k q``
  with ``k = argmax p`` and ``v = m_hat^(1/T_dist) / max`` (Eq. 3-4);
* per class: m_hat, v, how many images pass the threshold under ``p``, ``q`` and ``p'``, and
  the precision of those that pass; the quantiles of ``max q``.

With ``--baseline`` the same semantic pseudo-labels are computed from the baseline run's
final networks (its EMA features of the labeled set fill 256-deep balanced queues, as DASO's
would): whether better-trained features give confident semantic labels tells the scale
apart from a defect of DASO itself. The Markdown goes to ``--out`` (and stdout).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imbssl.engine.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from imbssl.engine.trainer import Trainer  # noqa: E402


def load_run(run_dir: Path) -> tuple[Trainer, dict]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.resume, cfg.overwrite, cfg.device = False, False, "cpu"
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise SystemExit(f"{run_dir}: no checkpoint")
    state = load_checkpoint(ckpt)
    trainer = Trainer(cfg, run_dir)
    trainer.load_state_dict(state, ckpt)
    return trainer, state


@torch.no_grad()
def forward(trainer: Trainer, model, images: torch.Tensor, bs: int = 1000):
    """(probs, features) of ``model`` in eval mode on uint8 ``images``."""
    was = model.training
    model.eval()
    probs, feats = [], []
    for i in range(0, len(images), bs):
        x = trainer._prepare(trainer.data.augmenter.normalize(images[i:i + bs]))
        out = model(x)
        probs.append(torch.softmax(out.logits.float(), -1))
        feats.append(out.features.float())
    model.train(was)
    return torch.cat(probs), torch.cat(feats)


def semantic(feats: torch.Tensor, protos: torch.Tensor, t_proto: float) -> torch.Tensor:
    """DASO Eq. 2: softmax of the cosine similarity to each class prototype over T_proto."""
    sim = F.normalize(feats, dim=1) @ F.normalize(protos, dim=1).T
    return torch.softmax(sim / t_proto, dim=1)


def blend(p: torch.Tensor, q: torch.Tensor, m_hat: torch.Tensor, t_dist: float):
    """DASO Eq. 3-4: v = m_hat^(1/T_dist) / max, p' = (1 - v_k) p + v_k q with k = argmax p."""
    v = m_hat.pow(1.0 / t_dist)
    v = v / v.max()
    vk = v[p.argmax(1)].unsqueeze(1)
    return (1 - vk) * p + vk * q, v


def queue_prototypes(state: dict) -> torch.Tensor:
    alg = state["algorithm"]
    queue, qlen = alg["refiner.queue"], alg["refiner.queue_len"]
    mask = (torch.arange(queue.shape[1])[None, :] < qlen[:, None]).float()
    return (queue * mask[..., None]).sum(1) / qlen.clamp_min(1)[:, None].float()


def balanced_prototypes(trainer: Trainer, size: int = 256) -> torch.Tensor:
    """Mean EMA feature of the last ``size`` labeled images of each class (DASO's queue)."""
    lab = trainer.data.labeled
    _, feats = forward(trainer, trainer.ema.model, lab.images)
    return torch.stack([feats[lab.labels == c][-size:].mean(0)
                        for c in range(trainer.data.num_classes)])


def pass_stats(probs: torch.Tensor, y: torch.Tensor, tau: float, k: int) -> tuple[list, list]:
    conf, pred = probs.max(1)
    ok = conf >= tau
    count = [int((ok & (pred == c)).sum()) for c in range(k)]
    prec = [float(((pred == c) & ok & (y == c)).sum() / max(1, int((ok & (pred == c)).sum())))
            for c in range(k)]
    return count, prec


def quantiles(x: torch.Tensor) -> str:
    qs = torch.quantile(x, torch.tensor([0.5, 0.9, 0.99]))
    return " / ".join(f"{v:.3f}" for v in qs)


def report(run_dir: Path, baseline: Path | None) -> str:
    trainer, state = load_run(run_dir)
    cfg = trainer.cfg
    k, tau = trainer.data.num_classes, float(cfg.algorithm.threshold)
    t_proto, t_dist = float(cfg.pseudo.proto_temperature), float(cfg.pseudo.dist_temperature)
    unl = trainer.data.unlabeled
    y = unl.labels.cpu()
    p, feats = forward(trainer, trainer.model, unl.images)
    m_hat = state["algorithm"]["refiner.m_hat"].float().cpu()
    q = semantic(feats, queue_prototypes(state), t_proto)
    final, v = blend(p, q, m_hat, t_dist)
    names = trainer.data.class_names
    out = [f"# DASO pseudo-labels at the end of `{run_dir.name}` (step {state['step']})", "",
           f"Unlabeled set: {len(y)} images, per class {trainer.data.unlabeled_counts}; "
           f"threshold {tau}, T_proto {t_proto}, T_dist {t_dist}. Online model in eval mode on "
           "the un-augmented images; DASO's own queues and m_hat from the checkpoint.", ""]
    rows = [("linear p", p), ("semantic q", q), ("blended p'", final)]
    out += ["| | " + " | ".join(names) + " | all |", "|---|" + "---|" * (k + 1),
            "| m_hat | " + " | ".join(f"{x:.3f}" for x in m_hat) + " | |",
            "| v | " + " | ".join(f"{x:.3f}" for x in v) + " | |"]
    for label, probs in rows:
        pred = probs.argmax(1)
        recall = [float(((pred == c) & (y == c)).sum() / max(1, int((y == c).sum())))
                  for c in range(k)]
        count, prec = pass_stats(probs, y, tau, k)
        out.append(f"| {label}: recall | " + " | ".join(f"{r * 100:.0f}" for r in recall)
                   + f" | {float((pred == y).float().mean()) * 100:.1f} |")
        out.append(f"| {label}: passing tau (count) | " + " | ".join(map(str, count))
                   + f" | {sum(count)} ({sum(count) / len(y) * 100:.1f}%) |")
        out.append(f"| {label}: precision of those | " + " | ".join(
            f"{x * 100:.0f}" if n else "–" for x, n in zip(prec, count)) + " | |")
    vk = v[p.argmax(1)]
    lin_ok = p.max(1).values >= tau
    lost = lin_ok & (final.max(1).values < tau)
    out += ["", f"- max q quantiles (median / 90% / 99%): {quantiles(q.max(1).values)}; "
            f"max p: {quantiles(p.max(1).values)}.",
            f"- images whose linear class has v > 0.5: {float((vk > 0.5).float().mean()) * 100:.1f}%"
            f"; linear labels passing tau: {int(lin_ok.sum())}, of which the blend drops "
            f"{int(lost.sum())} (precision of the dropped ones: "
            f"{float((p.argmax(1) == y)[lost].float().mean()) * 100 if lost.any() else 0:.0f}%).",
            ""]
    if baseline is not None:
        btr, bstate = load_run(baseline)
        bp, bfeats = forward(btr, btr.model, btr.data.unlabeled.images)
        bq = semantic(bfeats, balanced_prototypes(btr), t_proto)
        by = btr.data.unlabeled.labels.cpu()
        count, prec = pass_stats(bq, by, tau, k)
        out += [f"## Semantic pseudo-labels from `{baseline.name}` (step {bstate['step']})", "",
                "Balanced queues of its EMA features of the labeled set (last 256 per class), "
                "its online model's features of the unlabeled images:", "",
                f"- semantic accuracy {float((bq.argmax(1) == by).float().mean()) * 100:.1f}% "
                f"(linear {float((bp.argmax(1) == by).float().mean()) * 100:.1f}%); max q "
                f"quantiles {quantiles(bq.max(1).values)}; passing tau: {sum(count)} "
                f"({sum(count) / len(by) * 100:.1f}%), per class {count}.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    text = report(args.run, args.baseline)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
