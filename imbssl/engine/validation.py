"""Value checks the schemas' types cannot express, run before any data is loaded or any file
is written. Every failure is a one-line ``UserError`` that names the key, the bad value and
what to do.

Algorithm and refiner configs are checked *by field name* (the rules below), so a new
algorithm gets its temperatures, thresholds and weights checked without registering
anything; values a rule does not cover are left to the class's constructor, whose
``ValueError`` the trainer turns into a ``UserError`` as well.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from imbssl.errors import UserError

Rule = tuple[Callable[[str], bool], Callable[[float], bool], str]

#: (field-name predicate, value check, rule as words) - the first matching rule applies
FIELD_RULES: list[Rule] = [
    (lambda n: "temperature" in n or n.endswith("_temp"), lambda v: v > 0, "> 0"),
    (lambda n: "threshold" in n or n in ("p_cutoff", "tau"), lambda v: 0 < v <= 1,
     "in (0, 1]"),
    (lambda n: n == "uratio", lambda v: v >= 1, ">= 1"),
    (lambda n: n.startswith("lambda") or n.endswith("weight") or n.endswith("_ratio"),
     lambda v: v >= 0, ">= 0"),
    (lambda n: n.endswith("window") or n.endswith("queue_size") or n.endswith("_dim")
     or n.endswith("_len"), lambda v: v >= 1, ">= 1"),
    (lambda n: n.endswith("_iters") or n.endswith("_steps"), lambda v: v >= 0, ">= 0"),
    (lambda n: n == "smoothing_alpha" or n.endswith("_decay"), lambda v: 0 <= v <= 1,
     "in [0, 1]"),
    (lambda n: n.endswith("alpha"), lambda v: v > 0, "> 0"),
]

DIST_ALIGN_MODES = ("none", "labeled", "uniform")


def fail(key: str, value: Any, rule: str, hint: str = "") -> UserError:
    what = f"{key}={value!r} is invalid: it must be {rule}"
    if not hint:
        noun = "" if rule.startswith(("one of", "a ", "an ", "sgd")) else "a value "
        hint = f"set {key} to {noun}{rule}"
    return UserError(f"{what}; {hint}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_fields(prefix: str, obj: Any) -> None:
    """Apply :data:`FIELD_RULES` to every numeric field of the dataclass ``obj``; reject
    NaN/inf floats and unknown ``dist_align`` modes."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if f.name == "dist_align" and isinstance(value, str) and value not in DIST_ALIGN_MODES:
            raise fail(key, value, f"one of {', '.join(DIST_ALIGN_MODES)}",
                       f"choose one of {', '.join(DIST_ALIGN_MODES)}")
        if not _is_number(value):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(key, value, "a finite number")
        for matches, ok, rule in FIELD_RULES:
            if matches(f.name):
                if not ok(value):
                    raise fail(key, value, rule)
                break


def check_all(cfg: Any, tcfg: Any, ocfg: Any, mcfg: Any, dcfg: Any, algo_cfg: Any,
              pseudo_cfg: Any | None) -> None:
    """Every value check of a composed config (no data, no files)."""
    check_trainer(tcfg)
    check_optim(ocfg)
    check_model(mcfg)
    check_dataset(dcfg)
    check_fields("algorithm", algo_cfg)
    if pseudo_cfg is not None and dataclasses.is_dataclass(pseudo_cfg):
        check_fields("pseudo", pseudo_cfg)
    seed = cfg.get("seed", 0)
    if not (isinstance(seed, int) and 0 <= seed < 2**31):
        raise fail("seed", seed, "an integer in [0, 2^31)")
    check_path_names("run_dir", cfg.get("run_dir"))


def _checks(rows: list[tuple[bool, str, Any, str]]) -> None:
    for ok, key, value, rule in rows:
        if not ok:
            short = rule.split(" (")[0]
            raise fail(key, value, rule, f"set {key} to a value {short}" if short[0] in "<>=" else "")


def check_trainer(t: Any) -> None:
    _checks([
        (t.iterations >= 1, "trainer.iterations", t.iterations, ">= 1"),
        (t.batch_size >= 1, "trainer.batch_size", t.batch_size, ">= 1"),
        (t.eval_interval >= 1, "trainer.eval_interval", t.eval_interval, ">= 1"),
        (t.log_interval >= 0, "trainer.log_interval", t.log_interval, ">= 0 (0: never)"),
        (t.checkpoint_interval >= 0, "trainer.checkpoint_interval", t.checkpoint_interval,
         ">= 0 (0: never)"),
        (t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, ">= 1"),
        (t.summary_last >= 1, "trainer.summary_last", t.summary_last, ">= 1"),
        (t.summary_reduce in ("median", "mean"), "trainer.summary_reduce", t.summary_reduce,
         "median or mean"),
        (t.eval_batch_size >= 1, "trainer.eval_batch_size", t.eval_batch_size, ">= 1"),
        (t.precision in ("auto", "bf16", "fp16", "fp32"), "trainer.precision", t.precision,
         "one of auto, bf16, fp16, fp32"),
    ])


def check_optim(o: Any) -> None:
    _checks([
        (o.name in ("sgd", "adamw"), "optim.name", o.name, "sgd or adamw"),
        (math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "> 0"),
        (0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)"),
        (math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
         o.weight_decay, ">= 0"),
        (o.schedule in ("constant", "cosine", "multistep"), "optim.schedule", o.schedule,
         "constant, cosine or multistep"),
        (list(o.milestones) == sorted(o.milestones) and all(m >= 0 for m in o.milestones),
         "optim.milestones", list(o.milestones), "increasing steps >= 0"),
        (math.isfinite(o.gamma) and 0 < o.gamma <= 1, "optim.gamma", o.gamma, "in (0, 1]"),
        (o.warmup_iters >= 0, "optim.warmup_iters", o.warmup_iters, ">= 0"),
        (o.decay_scope in ("all", "no_bias_bn"), "optim.decay_scope", o.decay_scope,
         "all or no_bias_bn"),
    ])


def check_model(m: Any) -> None:
    from imbssl.models import MODEL_NAMES, NORM_CHOICES

    if m.name not in MODEL_NAMES:
        raise UserError(f"unknown model {m.name!r} (model.name={m.name}); choose one of "
                        f"{', '.join(MODEL_NAMES)}")
    _checks([(0 <= m.ema_decay < 1, "model.ema_decay", m.ema_decay, "in [0, 1)"),
             (m.bn_momentum is None or 0 <= m.bn_momentum <= 1, "model.bn_momentum",
              m.bn_momentum, "in [0, 1] or null"),
             (m.wrn_residual in ("official", "port"), "model.wrn_residual", m.wrn_residual,
              "official or port"),
             (m.ema_buffers in ("copy", "average"), "model.ema_buffers", m.ema_buffers,
              "copy or average")])
    choices = NORM_CHOICES.get(m.name, ("batch",))
    if m.norm not in choices:
        raise fail("model.norm", m.norm, f"one of {', '.join(choices)} for model={m.name}")


def check_dataset(d: Any) -> None:
    """What needs no data; counts per class are checked when the split is drawn."""
    _checks([
        (d.n1 >= 1, "dataset.n1", d.n1, ">= 1"),
        (d.m1 >= 0, "dataset.m1", d.m1, ">= 0"),
        (math.isfinite(d.gamma_l) and d.gamma_l >= 1, "dataset.gamma_l", d.gamma_l,
         ">= 1 (it is the imbalance ratio N_1 / N_K)"),
        (math.isfinite(d.gamma_u) and d.gamma_u >= 1, "dataset.gamma_u", d.gamma_u,
         ">= 1 (it is the imbalance ratio M_1 / M_K)"),
        (d.num_valid_per_class >= 0, "dataset.num_valid_per_class", d.num_valid_per_class,
         ">= 0"),
    ])


#: the longest file or folder name most file systems accept (bytes, NAME_MAX)
NAME_MAX = 255


def check_path_names(key: str, value: Any) -> None:
    """Every folder name in the path ``value`` fits the file system (<= NAME_MAX bytes)."""
    if not isinstance(value, str):
        return
    for part in value.split("/"):
        size = len(part.encode("utf-8", errors="surrogateescape"))
        if size > NAME_MAX:
            raise fail(key, f"{value[:40]}...", f"a path whose folder names have at most "
                       f"{NAME_MAX} bytes (one has {size})", f"choose a shorter {key}")
