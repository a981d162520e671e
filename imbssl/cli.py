"""``imbssl`` command line: train, eval, report, bench.

    imbssl train [overrides...]          train (Hydra overrides; -m for sweeps)
    imbssl eval ckpt=PATH [overrides...] evaluate a checkpoint's EMA model on the test set
    imbssl report RUN [RUN ...]          HTML + Markdown report of one or several runs
    imbssl bench [options]               training-throughput benchmark

A mistake in the input (config, data, run folder) is one line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXIT_USER_ERROR = 2


def fail(message: str) -> int:
    print(f"imbssl: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf messages span lines; keep what names the problem on one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type",
                                                      "Set the environment variable"))]
    return " ".join(lines) or type(exc).__name__


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from imbssl.errors import UserError

    return (UserError, HydraException, OmegaConfBaseException)


def compose(overrides: list[str]):
    """The config that ``imbssl train overrides`` will run (validated against the schemas)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from imbssl.engine.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def _preflight(overrides: list[str]) -> None:
    """Compose and check the run folder before Hydra writes anything into it."""
    from imbssl.engine.run_dir import holds_run

    cfg = compose([o for o in overrides if not o.startswith("hydra.")])
    run_dir = Path(cfg.run_dir)
    if not cfg.resume and not cfg.overwrite and holds_run(run_dir):
        from imbssl.errors import UserError

        raise UserError(f"run_dir {run_dir} already holds a run; pass resume=true to continue "
                        "it, overwrite=true to start afresh, or choose another run_dir")


def _hydra_train(overrides: list[str], debug: bool) -> int:
    import hydra

    from imbssl.engine.config import register_configs

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def task(cfg):
        from imbssl.engine.trainer import NonFiniteLossError, timed_run

        try:
            return timed_run(cfg)
        except NonFiniteLossError as exc:
            print(f"imbssl: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except user_errors() as exc:
            if debug:
                raise
            raise SystemExit(fail(one_line(exc))) from None

    register_configs()
    sys.argv = ["imbssl-train", *overrides]
    task()
    return 0


def train(args: list[str], debug: bool) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun and not any(a.startswith(("--cfg", "-c", "--help", "--info")) for a in args):
        _preflight(args)
    return _hydra_train(args, debug)


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
        if command == "bench":
            from imbssl.bench import main as bench_main

            return bench_main(rest)
        return fail(f"unknown command {command!r}; use one of train, eval, report, bench")
    except user_errors() as exc:
        if debug:
            raise
        return fail(one_line(exc))


if __name__ == "__main__":
    sys.exit(main())
