"""``imbssl`` command line: train, eval, report, bench.

    imbssl train [overrides...]          train (Hydra overrides; -m for sweeps; several GPUs:
                                         torchrun --nproc_per_node=N -m imbssl train ...)
    imbssl eval ckpt=PATH [overrides...] evaluate a checkpoint's EMA model on the test set
    imbssl report RUN [RUN ...]          HTML + Markdown report of one or several runs
    imbssl compare SWEEP [RUN ...]       tables and accuracy / tail recall vs gamma of a sweep
    imbssl bench [options]               training-throughput benchmark

A mistake in the input (config, data, run folder) is one line on stderr and exit code 2;
``--debug`` shows the traceback instead (a busy run folder, another process writing it, is
such a line too). Other exit codes: 1 a non-finite loss or weights (the run diverged), 74 a
write that failed (a full disk or quota, a read-only file system; sysexits EX_IOERR), 75
preempted (SIGTERM/SIGUSR1/SIGUSR2: the step was checkpointed, ``resume=true`` continues;
sysexits EX_TEMPFAIL).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXIT_USER_ERROR = 2
EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: try again (resume=true)


#: options a one-line 'unknown option' error lists in full (every algorithm; experiments
#: are many more and are cut)
SHOWN_OPTIONS = 30

def fail(message: str) -> int:
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports it
        print(f"imbssl: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf messages span lines; keep what names the problem on one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type",
                                                      "Set the environment variable"))]
    return " ".join(lines) or type(exc).__name__


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(exc: BaseException) -> str:
    """One line that names the bad key or value and what to do, for any user error."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from imbssl.engine.config import describe_config_error
    from imbssl.errors import UserError

    if isinstance(exc, UserError):
        return one_line(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        options = [o for o in (exc.options or []) if not o.endswith("_schema")]
        if group and options:
            shown = ", ".join(options[:SHOWN_OPTIONS]) + (
                f", ... ({len(options)} in all, see configs/{group}/)"
                if len(options) > SHOWN_OPTIONS else "")
            return f"unknown {group} {option!r} ({group}={option}); choose one of {shown}"
        return f"config {exc.missing_cfg_file!r} not found; check the name"
    if isinstance(exc, OverrideParseException):
        text = one_line(exc).split(" See https://")[0]
        return f"{text}; write overrides as key=value (e.g. trainer.iterations=100)"
    override = (re.search(r"override (\S+)", str(exc))
                or re.search(r"use \+(\S+=\S*)", str(exc)))
    for cause in _chain(exc):
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            text = describe_config_error(cause)
            return f"{text} (in {override.group(1)})" if override else text
    return one_line(exc)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from imbssl.errors import UserError

    return (UserError, HydraException, OmegaConfBaseException)


def compose(overrides: list[str]):
    """The config that ``imbssl train overrides`` will run (validated against the schemas)."""
    from imbssl.engine.config import compose as compose_config

    return compose_config(overrides)


def _is_hydra_override(arg: str) -> bool:
    return arg.lstrip("+~").startswith(("hydra.", "hydra/"))


def _build(overrides: list[str]):
    """Compose, check every value, build the trainer and check (or load, on resume) the run
    folder, all before Hydra creates ``.hydra/`` and its log file in the run folder: a bad
    input leaves an existing run folder exactly as it was."""
    from imbssl.engine import distributed as ddp
    from imbssl.engine.config import check_top_level_keys
    from imbssl.engine.run_dir import check_hydra_run_dir
    from imbssl.engine.trainer import Trainer

    cfg = compose([o for o in overrides if not _is_hydra_override(o)])
    check_top_level_keys(cfg)  # +seeed=3
    run_dir = Path(cfg.run_dir).absolute()  # hydra.job.chdir=true must not move it
    check_hydra_run_dir(overrides, run_dir)
    if ddp.launch_info() is not None:
        ddp.init_from_env(str(cfg.get("device", "auto")))
    trainer = Trainer(cfg, run_dir=run_dir)
    trainer.prepare()
    return cfg, trainer


def _run_task(cfg, trainer, debug: bool):
    from imbssl.engine.trainer import NonFiniteLossError, Preempted, timed_run
    from imbssl.fileio import DiskFullError, is_write_failure

    try:
        if trainer is None:  # a sweep's job: built here
            from imbssl.engine.config import check_top_level_keys

            check_top_level_keys(cfg)
        return timed_run(cfg, trainer)
    except NonFiniteLossError as exc:
        fail(str(exc))  # one line, from process 0 under torchrun
        raise SystemExit(1) from None
    except Preempted as exc:
        fail(str(exc))
        raise SystemExit(EXIT_PREEMPTED) from None
    except DiskFullError as exc:
        fail(str(exc))
        raise SystemExit(EXIT_DISK_FULL) from None
    except user_errors() as exc:
        if debug:
            raise
        raise SystemExit(fail(describe(exc))) from None
    except OSError as exc:
        if debug or not is_write_failure(exc):
            raise
        raise SystemExit(write_failed(exc, trainer)) from None


def write_failed(exc: OSError, trainer=None) -> int:
    """A full disk, a read-only file system or an I/O error: one line, exit code 74."""
    from imbssl.fileio import describe_write_failure

    where = f"a file in {trainer.run_dir}" if trainer is not None else ""
    fail(describe_write_failure(exc, where))
    return EXIT_DISK_FULL


def _hydra_train(overrides: list[str], debug: bool, trainer=None) -> int:
    import hydra

    from imbssl.engine.config import register_configs

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def task(cfg):
        return _run_task(cfg, trainer, debug)

    register_configs()
    sys.argv = ["imbssl-train", *overrides]
    if trainer is None:
        task()
        return 0
    with _hydra_errors_raised():  # e.g. a full disk while Hydra writes .hydra/: one line
        task()
    return 0


class _hydra_errors_raised:
    """Let an exception in Hydra's own work (writing ``.hydra/``, its job log) reach
    ``main`` (HYDRA_FULL_ERROR=1) instead of Hydra's multi-line report and exit code 1."""

    def __enter__(self):
        import os

        self._old = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"

    def __exit__(self, *exc):
        import os

        if self._old is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = self._old
        return False


def train(args: list[str], debug: bool) -> int:
    from imbssl.engine import distributed as ddp

    multirun = any(a in ("-m", "--multirun") for a in args)
    if multirun or any(a.startswith(("--cfg", "-c", "--help", "--info", "--hydra-help",
                                     "--shell-completion", "-p", "--package"))
                       for a in args):
        return _hydra_train(args, debug)  # sweeps: every job builds (and checks) its own
    try:
        cfg, trainer = _build(args)
        if ddp.is_main():  # Hydra (config copy, job log) for process 0 only
            return _hydra_train(args, debug, trainer)
        _run_task(cfg, trainer, debug)
        return 0
    finally:
        ddp.shutdown()


def evaluate(args: list[str]) -> int:
    from imbssl.engine.evaluate_ckpt import evaluate_checkpoint

    ckpt = [a.split("=", 1)[1] for a in args if a.startswith("ckpt=")]
    if not ckpt:
        return fail("imbssl eval needs ckpt=PATH (a checkpoint under RUN/checkpoints/)")
    evaluate_checkpoint(Path(ckpt[0]), [a for a in args if not a.startswith("ckpt=")])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_USER_ERROR
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return train(rest, debug)
        if command == "eval":
            return evaluate(rest)
        if command == "report":
            from imbssl.diagnostics.report import report_main

            return report_main(rest)
        if command == "compare":
            from imbssl.diagnostics.aggregate import collect_main

            return collect_main(rest, prog="imbssl compare")
        if command == "bench":
            from imbssl.bench import main as bench_main

            return bench_main(rest)
        return fail(f"unknown command {command!r}; use one of train, eval, report, compare, bench")
    except user_errors() as exc:
        if debug:
            raise
        return fail(describe(exc))
    except OSError as exc:  # a write that failed outside training (start, report, caches)
        from imbssl.fileio import is_write_failure

        if debug or not is_write_failure(exc):
            raise
        return write_failed(exc)
    except RuntimeError as exc:
        from imbssl.fileio import DiskFullError

        if debug or not isinstance(exc, DiskFullError):
            raise
        fail(str(exc))
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
