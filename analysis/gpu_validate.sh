#!/usr/bin/env bash
# GPU validation in one command (issue 13): every CUDA path, the speed and a 5-minute
# accuracy curve, written to gpu_validate.json + gpu_validate.md (+ gpu_validate.log).
# What it checks: imbssl/bench/validate/; the figures it produced: BENCHMARKS.md.
#
# 1. Here, once (the device machine cannot reach /work/shared, the venv or PyPI):
#        bash analysis/gpu_validate.sh --prep
#    copies the Hydra wheels (hydra_core, omegaconf, antlr4) and the CIFAR-10 JPEG npz files
#    with their materialize.py into .device/ (ignored by git, about 56 MiB; with the working
#    tree under the device tool's 64 MiB) and prints the total that will travel.
# 2. On the GPU machine, through the device tool (about 8 minutes, of a 10-minute call):
#        run(command="bash analysis/gpu_validate.sh", carry=[".device"], timeout_s=540)
#    It installs the wheels into .device/site (pip --no-index --no-deps --target), writes
#    CIFAR-10 into .device/datasets/cifar-10-batches-py and runs
#    python -m imbssl.bench.validate run --out "$OUT" (extra options are passed on, e.g.
#    --only smoke,sync to rerun what failed, --set recipe=daso_official).
# 3. Here: copy gpu_validate.{json,md} from the run's files into analysis/results/gpu/.
#
# CPU check of the same code (the test suite runs it): bash analysis/gpu_validate.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=.device
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [[ "${1:-}" == "--prep" ]]; then
    shift
    exec "$PY" -m imbssl.bench.validate prep "$@"
fi

if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    if ! compgen -G "$DEV/wheels/*.whl" >/dev/null; then
        echo "gpu_validate: Hydra is missing and $DEV/wheels/ is empty; run --prep here first" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$DEV/site" "$DEV"/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$PWD/$DEV/site"
fi
if [[ -f $DEV/data/materialize.py && ! -f $DEV/datasets/cifar-10-batches-py/test_batch ]]; then
    "$PY" "$DEV/data/materialize.py" "$DEV/datasets"
fi

OUTDIR=${OUT:-analysis/results/gpu}
for arg in "$@"; do [[ $arg == --dry-run ]] && OUTDIR=${OUT:-${TMPDIR:-/tmp}/gpu_validate_dry}; done
prev=""
for arg in "$@"; do [[ $prev == --out ]] && OUTDIR=$arg; prev=$arg; done
mkdir -p "$OUTDIR"
set +e
"$PY" -m imbssl.bench.validate run --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_validate.log"
exit "${PIPESTATUS[0]}"
