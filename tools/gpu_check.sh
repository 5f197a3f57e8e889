#!/usr/bin/env bash
# The project's GPU checks as one prepared script, for a lent GPU machine whose image has
# PyTorch with CUDA but neither megatron-core nor Hydra, and no network.
#
#   bash tools/gpu_check.sh wheels          # here (PyPI reachable): the missing packages into .whl/
#   bash tools/gpu_check.sh run "$OUT"      # there, with .whl carried: install, check, results into $OUT
#
# With the device tool: run(command='bash tools/gpu_check.sh run "$OUT"', carry=[".whl"],
# timeout_s=540). .whl/ is git-ignored; `wheels` fetches CPython 3.12 manylinux wheels (the
# image's python3) of the versions this checkout's .venv holds, else the pinned ones below.
#
# `run` does, each step under its own time limit, going on after a failure (about 6 minutes
# on one H100; the exit status is the number of failed steps):
#   1. gpu_tests     pytest -m gpu: bf16 grouped_mm against the loop, statistics on the device,
#                    one host sync per forward and none in the backward (tests/test_gpu_syncs.py)
#   2. paths         tools/bench_expert_paths.py --dtype bf16: grouped_mm against the loop
#   3. layer         tools/bench_layer.py --full --dtype bf16: the whole layer against
#                    megatron-core's MoELayer and the floor (one GPU, EP = 1)
#   4. train_ae      30 steps of experiment=digits_cpu (moe=anyexperts) on the GPU in bf16,
#                    NCCL world of 1 (scikit-learn's digits: no download)
#   5. train_topk    the same with moe=topk moe.grouped_gemm=true (the project's top-k path)
# Not checked: NCCL's uneven all_to_all at EP > 1, which needs a GPU per rank (one is lent).
# Into OUT (5 files, under the device tool's limit of 8): gpu_check.log (versions, every
# step's output and a summary line per step), paths.json, layer.json, and the two training
# runs' metrics (train_ae.metrics.jsonl, train_topk.metrics.jsonl); run directories in RUNS.
#
# A dry run of the script itself on a CPU machine (small benchmarks, fp32 training, the
# .venv's packages, no wheels): QUICK=1 PYTHON=.venv/bin/python bash tools/gpu_check.sh run /tmp/out
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY_VERSION=3.12
PYTHON=${PYTHON:-python3}
QUICK=${QUICK:-0}
RUNS=${RUNS:-/tmp/gpu_check}
FALLBACK_PINS=(megatron-core==0.16.1 hydra-core==1.4.0rc3 omegaconf==2.4.1rc1)

wheels() {
    local pins=() name version
    for pin in "${FALLBACK_PINS[@]}"; do
        name=${pin%%==*}
        version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        pins+=("$name==${version:-${pin##*==}}")
    done
    mkdir -p .whl
    local pip_python=python3
    [ -x .venv/bin/python ] && pip_python=.venv/bin/python
    "$pip_python" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${pins[@]}" || exit 1
    ls -l .whl
}

step() {  # step NAME SECONDS COMMAND...: run one check, log it, count a failure
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "===== $name: $*" >>"$OUT/gpu_check.log"
    timeout "$limit" "$@" >>"$OUT/gpu_check.log" 2>&1
    rc=$?
    SUMMARY+="$name: exit $rc in $(( $(date +%s) - start )) s"$'\n'
    echo "$name: exit $rc in $(( $(date +%s) - start )) s"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

train() {  # train NAME OVERRIDES...: 30 bf16 steps of the digits job on this GPU
    local name=$1 precision=bf16
    shift
    [ "$QUICK" = 1 ] && precision=fp32
    "$PYTHON" -m launcher.train experiment=digits_cpu parallel.expert_model_parallel_size=1 \
        trainer.precision=$precision trainer.max_steps=30 trainer.eval_interval=30 trainer.pictures_at_end=false \
        trainer.routing_trace_at_end=false checkpoint.interval=0 checkpoint.save_at_end=false \
        logging.log_interval=10 logging.tensorboard=false "experiment.run_dir=$RUNS/$name" "$@" &&
        cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl"
}

run() {
    OUT=${1:?usage: gpu_check.sh run OUT_DIR}
    mkdir -p "$OUT"
    FAILED=0 SUMMARY=""
    if ! "$PYTHON" -c "import megatron.core, hydra" 2>/dev/null; then
        if ! ls .whl/*.whl >/dev/null 2>&1; then
            echo "no wheels in .whl/: run 'bash tools/gpu_check.sh wheels' here and carry .whl" >&2
            exit 2
        fi
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 2
    fi
    export PYTHONPATH="/tmp/site:$REPO" PYTHONUNBUFFERED=1 PYTHON QUICK OUT RUNS
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      "$PYTHON" -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'megatron-core', m.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
    } 2>&1 | tee "$OUT/gpu_check.log"
    local paths_grid=(--experts 8 64 128 --rows-per-expert 8 64 256 1024) layer_grid=(--full --repeats 5)
    [ "$QUICK" = 1 ] && paths_grid=(--quick) layer_grid=(--quick)
    step gpu_tests 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
    step paths 90 "$PYTHON" tools/bench_expert_paths.py --dtype bf16 "${paths_grid[@]}" --json "$OUT/paths.json"
    step layer 240 "$PYTHON" tools/bench_layer.py --dtype bf16 "${layer_grid[@]}" --json "$OUT/layer.json"
    step train_ae 90 bash "$0" train train_ae moe=anyexperts
    step train_topk 90 bash "$0" train train_topk moe=topk moe.grouped_gemm=true
    printf "===== summary\n%sfailed steps: %s\n" "$SUMMARY" "$FAILED" | tee -a "$OUT/gpu_check.log"
    exit "$FAILED"
}

case "${1:-}" in
    wheels) wheels ;;
    run) shift; run "$@" ;;
    train) shift; train "$@" ;;  # one training check (run calls it under a time limit)
    *) sed -n '2,28p' "$0"; exit 2 ;;
esac
