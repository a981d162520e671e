"""``imbssl eval ckpt=PATH``: the EMA model of a checkpoint on the test set."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from imbssl.errors import UserError

#: the entries ``imbssl eval`` reads from a checkpoint, with their types
EVAL_FIELDS: dict[str, type] = {"step": int, "num_classes": int, "model_name": str, "ema": dict}
#: exceptions of ``load_state_dict`` on a state that does not fit
_LOAD_ERRORS = (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError)


def evaluate_checkpoint(ckpt: Path, overrides: list[str]) -> dict:
    """Rebuild the run from its saved config, load the checkpoint, evaluate and print."""
    from imbssl.diagnostics.metrics import confusion_to_metrics, format_per_class_table
    from imbssl.engine.checkpoint import load_checkpoint
    from imbssl.engine.evaluate import confusion_matrix
    from imbssl.engine.trainer import check_compatible

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
    cfg = OmegaConf.merge(saved, eval_overrides(saved, overrides))
    cfg.resume, cfg.overwrite = False, False
    state = load_checkpoint(ckpt)
    check_eval_fields(state, ckpt)
    trainer = _build_trainer(cfg, run_dir, overrides)
    check_compatible(state, trainer.data.num_classes, trainer.mcfg.name,
                     str(cfg.algorithm.name), trainer.mcfg.norm)
    _load_part(ckpt, "EMA model", lambda: trainer.ema.load_state_dict(state["ema"]))
    if "algorithm" in state:  # eval_logits may read the algorithm's state (e.g. its priors)
        _load_part(ckpt, "algorithm state",
                   lambda: trainer.algo.load_state_dict(state["algorithm"]))
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


def eval_overrides(saved: DictConfig, overrides: list[str]) -> DictConfig:
    """The ``key=value`` overrides as a config. ``imbssl eval`` rebuilds the run from its
    saved config, so replacing a whole group (``model=wrn28_2``) is refused: the checkpoint
    holds that run's model; single keys (``dataset.root=...``, ``device=cpu``) are allowed."""
    dotlist = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or not key:
            raise UserError(f"imbssl eval: {item!r} is not an override; write key=value "
                            f"(e.g. dataset.root=datasets)")
        group = saved.get(key) if "." not in key else None
        if isinstance(group, DictConfig):
            name = group.get("name")
            if value == str(name):
                continue  # the checkpoint's own choice: nothing changes
            raise UserError(f"imbssl eval: {item} does not fit {key}={name} that the checkpoint "
                            f"was trained with; eval rebuilds the run from its saved config: "
                            f"drop {item} (single keys such as {key}.<field>=... can be set)")
        dotlist.append(f"{key}={value}")
    try:
        return OmegaConf.from_dotlist(dotlist)
    except Exception as exc:  # noqa: BLE001 - OmegaConf's grammar errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"imbssl eval: cannot read the overrides {dotlist} ({first[:150]}); "
                        f"write key=value") from None


def check_eval_fields(state: dict, ckpt: Path) -> None:
    """The entries eval reads exist with the right types, before anything is built."""
    for key, kind in EVAL_FIELDS.items():
        if key not in state:
            raise UserError(f"checkpoint {ckpt} has no {key!r} entry: it is damaged or not an "
                            f"imbssl checkpoint; evaluate another checkpoint of the run")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"checkpoint {ckpt} is damaged: its {key!r} entry is a "
                            f"{type(value).__name__}, expected {kind.__name__}; evaluate "
                            f"another checkpoint of the run")
    if state["step"] < 0 or state["num_classes"] < 1:
        raise UserError(f"checkpoint {ckpt} is damaged: step={state['step']}, "
                        f"num_classes={state['num_classes']}; evaluate another checkpoint")
    if "algorithm" in state and not isinstance(state["algorithm"], dict):
        raise UserError(f"checkpoint {ckpt} is damaged: its 'algorithm' entry is a "
                        f"{type(state['algorithm']).__name__}, expected dict")


def _build_trainer(cfg: DictConfig, run_dir: Path, overrides: list[str]):
    """The run's Trainer; a config that no longer builds is a one-line UserError."""
    from imbssl.engine.trainer import Trainer

    try:
        return Trainer(cfg, run_dir)
    except UserError:
        raise
    except ValueError as exc:  # OmegaConf's merge into the schemas
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"imbssl eval: the run's saved config with {overrides or 'no overrides'} "
                        f"does not build ({first[:150]}); evaluate without overrides") from exc


def _load_part(ckpt: Path, name: str, load) -> None:
    """``load()``, its failure a one-line UserError naming the part of the checkpoint."""
    try:
        load()
    except _LOAD_ERRORS as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        raise UserError(f"{ckpt}: its {name} does not fit the configured run ({reason[:200]}); "
                        f"evaluate without overrides, or another checkpoint") from None
