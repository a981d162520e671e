"""GPU validation in one command: every CUDA path, the speed and a short accuracy curve.

One module per check (``aug``, ``bench``, ``train``, ``smoke``), ``run`` (their order and
budget), ``output`` (json + Markdown), ``prep`` and ``cli``; ``common``: constants, results.

    bash analysis/gpu_validate.sh --prep      # here: wheels + CIFAR-10 into .device/ (ignored)
    bash analysis/gpu_validate.sh             # on the GPU machine (BENCHMARKS.md: the run call)
    bash analysis/gpu_validate.sh --dry-run   # CPU: tiny model, 2 steps (tests/bench/)

``python -m imbssl.bench.validate run`` checks, in this order, and rewrites
``gpu_validate.json`` and ``gpu_validate.md`` in ``--out`` after each item:

1. ``aug``: the CUDA augmentation equals the CPU one. A CPU generator draws every random
   choice of a weak and a strong view (flip, crop, 2 RandAugment ops with level, sign and
   p = 0.5, Cutout) exactly as ``Augmenter.strong_u8`` draws them, and ``replay_strong``
   applies them with the augmentation's own ops on the CPU and on CUDA. The CPU replay must
   equal ``Augmenter.strong_u8`` bit for bit (so the replay is the implementation); the CUDA
   result must equal the CPU one bit for bit for the weak view and the LUT ops, and differ in
   at most ``AUG_TOLERANCE`` of the strong views' pixels (nearest-neighbour sampling of
   rotate / shear at pixel boundaries where the two devices round ``affine_grid``
   differently). The draws themselves differ by design: each device has its own generator.
2. ``bench``: ``imbssl bench --experiments`` for the bench rows (default WRN-28-2 FixMatch and
   FixMatch+DASO, DASO's batch: 64 labeled + 128 unlabeled x 2 views) in each of
   ``--precisions`` (fp32 and bf16), compiled like ``trainer=daso_protocol``: it/s, MFU and
   the 250k-iteration time; the DataLoader + PIL pipeline beside it at bf16.
3. ``train``: the train row (FixMatch+DASO, CIFAR-10-LT) for ``--train-s`` seconds in a
   subprocess (``imbssl train experiment=ROW``, stopped with SIGINT), its accuracy curve
   read from ``metrics.jsonl``. It runs while item 4 runs (the GPU is shared: its it/s is
   not a speed figure); it gets the time the budget leaves, at most ``--train-s``.
4. ``smoke``: ``--steps`` (30) steps of every algorithm, alone and with DASO (the smoke
   rows, and the supervised baseline), bf16, channels_last, fused SGD, data on the device,
   ``torch.compile`` off, then on: finite losses, a complete run folder, and the paths the
   trainer took. After each run, ``sync``: ``--sync-steps`` more steady-state steps under
   ``torch.cuda.set_sync_debug_mode("warn")`` (every host sync, with its line) and as many
   under ``"error"``; the step passes when neither finds a sync.
5. ``nccl_syncbn``: NCCL all-reduce and SyncBatchNorm need two GPUs or more; one is lent, so
   it is listed as skipped.

``--dry-run`` runs the same code on the CPU (digits-LT, the small CNN, 2 steps); the CUDA-only
checks (CUDA augmentation, compile on, sync, bf16/channels_last/fused expectations, MFU) are
skipped and listed as skipped. ``--budget-s`` bounds the whole command (the device tool's
call is 10 minutes at most); an item the budget cannot fit is skipped, not cut short, except
the training run, which is shortened. Exit code 0 when no item failed, 1 otherwise.
"""
from __future__ import annotations

from imbssl.bench.validate.aug import (  # noqa: F401
    _aug_images,
    check_aug,
    draw_strong_params,
    params_to,
    replay_strong,
    replay_weak,
)
from imbssl.bench.validate.bench import (  # noqa: F401
    run_bench,
)
from imbssl.bench.validate.cli import (  # noqa: F401
    _context,
    main,
    parser,
)
from imbssl.bench.validate.common import (  # noqa: F401
    AUG_IMAGES,
    AUG_TOLERANCE,
    BENCH_RESERVE_S,
    BENCH_ROWS,
    CARRY_LIMIT_MIB,
    DEVICE_DIR,
    DRY,
    DRY_RUN_OVERRIDES,
    FINISH_RESERVE_S,
    GPU,
    PRECISIONS,
    REPO,
    SETTING,
    SHARED,
    SMOKE_CASE_S,
    SMOKE_ROWS,
    SUPERVISED,
    TRAIN_ROW,
    WHEELS,
    Context,
    error_text,
    failed,
    innermost_frame,
    passed,
    skipped,
)
from imbssl.bench.validate.output import (  # noqa: F401
    _pct,
    commit_line,
    markdown,
    write_results,
)
from imbssl.bench.validate.prep import (  # noqa: F401
    git_commit_of,
    prep,
    tree_bytes,
)
from imbssl.bench.validate.run import (  # noqa: F401
    environment,
    run_all,
    skipped_list,
    summarize_sync,
)
from imbssl.bench.validate.smoke import (  # noqa: F401
    check_sync,
    dynamo_counts,
    loss_problems,
    path_problems,
    run_folder_problems,
    run_smoke,
    run_smoke_case,
    smoke_cases,
    smoke_overrides,
    sync_site,
    trainer_paths,
    with_daso_schedule,
)
from imbssl.bench.validate.train import (  # noqa: F401
    TrainingRun,
    accuracy_curve,
    finish_training,
    read_jsonl,
    start_training,
)
