"""``imbssl eval ckpt=PATH``: the EMA model of a checkpoint on the test set."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from imbssl.errors import UserError


def evaluate_checkpoint(ckpt: Path, overrides: list[str]) -> dict:
    """Rebuild the run from its saved config, load the checkpoint, evaluate and print."""
    from imbssl.diagnostics.metrics import confusion_to_metrics, format_per_class_table
    from imbssl.engine.checkpoint import load_checkpoint
    from imbssl.engine.evaluate import confusion_matrix
    from imbssl.engine.trainer import Trainer, check_compatible

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise UserError(f"checkpoint {ckpt} does not exist (or is not a file); pass "
                        "ckpt=RUN/checkpoints/ckpt_<step>.pt")
    run_dir = ckpt.resolve().parent.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} not found: ckpt must lie in RUN/checkpoints/ of a run folder")
    try:
        saved = OmegaConf.load(cfg_path)
    except Exception as exc:  # noqa: BLE001 - yaml/OmegaConf errors of a damaged file
        raise UserError(f"{cfg_path} cannot be read ({type(exc).__name__}); the run folder is "
                        "damaged") from None
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    cfg.resume, cfg.overwrite = False, False
    state = load_checkpoint(ckpt)
    trainer = Trainer(cfg, run_dir)
    check_compatible(state, trainer.data.num_classes, trainer.mcfg.name,
                     str(cfg.algorithm.name), trainer.mcfg.norm)
    try:
        trainer.ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{ckpt}: its EMA model does not fit the configured model "
                        f"({first[:200]}); evaluate without overrides") from None
    if "algorithm" in state:  # eval_logits may read the algorithm's state (e.g. its priors)
        trainer.algo.load_state_dict(state["algorithm"])
    test = trainer.data.test
    conf = confusion_matrix(trainer.ema.model.to(trainer.device), test.images, test.labels,
                            lambda x: trainer._prepare(trainer.data.augmenter.normalize(x)),
                            trainer.data.num_classes, trainer.tcfg.eval_batch_size,
                            trainer.autocast,
                            predict=trainer.algo.eval_predictor(trainer.ema.model)).cpu().numpy()
    metrics = confusion_to_metrics(conf)
    print(format_per_class_table(metrics, trainer.data.class_names, trainer.data.labeled_counts))
    print(f"checkpoint step {state['step']}: test top-1 {metrics['top1'] * 100:.2f}%, "
          f"balanced accuracy {metrics['balanced_acc'] * 100:.2f}%")
    return metrics
