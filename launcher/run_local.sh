#!/usr/bin/env bash
# Pretraining on this machine: torchrun starts NPROC ranks of `python -m launcher.train`,
# and every argument is a Hydra override.
#
#   NPROC=2 PYTHON=.venv/bin/python launcher/run_local.sh experiment=shakespeare_cpu
#
# Environment:
#   NPROC      ranks to start (default 2)
#   LOG_RANKS  local ranks whose output reaches the console: "0" (default), "0,1", or "all".
#              Every rank's stdout/stderr is also written under LOG_DIR (torchrun --tee 3).
#   LOG_DIR    torchrun's log folder (default: <experiment.run_dir>/torchrun_logs when that
#              override is given, else runs/torchrun_logs)
#   PYTHON     interpreter (default python)
# For several nodes use slurm/pretrain_torchrun.sbatch or slurm/pretrain_srun.sbatch.
set -euo pipefail

NPROC="${NPROC:-2}"
LOG_RANKS="${LOG_RANKS:-0}"
PYTHON="${PYTHON:-python}"

if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_local.sh: NPROC=$NPROC is not a positive integer; e.g. NPROC=2" >&2
  exit 2
fi

if [[ -z "${LOG_DIR:-}" ]]; then
  LOG_DIR="runs/torchrun_logs"
  for arg in "$@"; do
    if [[ "$arg" == experiment.run_dir=* ]]; then
      LOG_DIR="${arg#experiment.run_dir=}/torchrun_logs"
    fi
  done
fi
mkdir -p "$LOG_DIR"

if [[ "$LOG_RANKS" == all ]]; then
  LOG_RANKS="$(seq -s, 0 $((NPROC - 1)))"
fi

# torchrun would set OMP_NUM_THREADS=1 with a warning; share the cores between the ranks instead.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  threads=$((cores / NPROC))
  export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi
# Lines reach the console and the --tee files as they are printed, not at exit.
export PYTHONUNBUFFERED=1
# `-m launcher.train` resolves from a checkout that is not pip-installed too.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON" -m torch.distributed.run \
  --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  --log-dir="$LOG_DIR" --tee=3 --local-ranks-filter="$LOG_RANKS" \
  -m launcher.train "$@"
