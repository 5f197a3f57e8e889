# Sourced by slurm/*.sbatch in the batch shell, once per job and before srun. It derives what
# every rank and every requeue of the job must agree on (rendezvous host and port, run
# directory) and defines anyexperts_run_step, which runs the srun step with signal
# forwarding and requeue. The ranks themselves are found later, per task, by
# launcher/bootstrap.py (pattern b) or by torchrun (pattern a).
#
# Try it without Slurm:
#   SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='node[07-08]' bash -c 'source slurm/_env.sh && env | grep -E "^(MASTER|RUN_DIR)"'
#
# In:  SLURM_JOB_ID, SLURM_JOB_NODELIST (Slurm sets both in the batch shell).
#      Optional, to override: MASTER_ADDR, MASTER_PORT, RUN_NAME (default: the job name),
#      RUN_ROOT (default: $PWD/runs), RUN_DIR, PYTHON (default: python),
#      REQUEUE_FROM_BATCH (default 1: requeue after the time-limit signal).
# Out: exported MASTER_ADDR, MASTER_PORT, RUN_NAME, RUN_DIR, LOG_DIR, SRUN_CPUS_PER_TASK; PYTHON;
#      anyexperts_threads_per_rank (exports OMP_NUM_THREADS) and anyexperts_run_step.

if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" ]]; then
  echo "slurm/_env.sh: SLURM_JOB_ID and SLURM_JOB_NODELIST are not set; submit with sbatch" \
       "(to try it by hand, export both first)" >&2
  return 1 2>/dev/null || exit 1
fi

# First host of a Slurm hostlist, without scontrol: every [...] group becomes its first
# number, then everything from the first top-level comma goes. "node[01-03,07],gpu[1-2]" ->
# node01; the same host `scontrol show hostnames "$1" | head -n1` prints, and the same as
# launcher.bootstrap.first_host (tests/test_slurm_templates.py checks that they agree).
anyexperts_first_host() {
  sed -E 's/\[([0-9]+)[^]]*\]/\1/g; s/,.*//' <<<"$1"
}

PYTHON="${PYTHON:-python}"
# Rank 0 runs on the first node of the allocation (srun's block distribution).
MASTER_ADDR="${MASTER_ADDR:-$(anyexperts_first_host "${SLURM_JOB_NODELIST:-$SLURM_NODELIST}")}"
# Same formula as launcher.bootstrap.slurm_master_port: stable across requeues of this job,
# different for jobs with neighbouring ids that share a head node.
MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-anyexperts}}"
RUN_ROOT="${RUN_ROOT:-$PWD/runs}"
# The job id survives `scontrol requeue`, so a requeued job finds its checkpoints here.
RUN_DIR="${RUN_DIR:-$RUN_ROOT/$RUN_NAME/slurm-$SLURM_JOB_ID}"
LOG_DIR="$RUN_DIR/logs"
export MASTER_ADDR MASTER_PORT RUN_NAME RUN_DIR LOG_DIR
mkdir -p "$LOG_DIR"
# Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task, and each task would get
# one CPU (torchrun and all its workers included).
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
fi

# anyexperts_threads_per_rank N: exports OMP_NUM_THREADS for ranks that run N to an srun task
# (1 for a task per rank, the worker count under torchrun) and prints where it came from.
# Without it each rank starts one torch thread per core of the node, not per CPU it was
# given, and torchrun would set 1 for its workers. A value the submitter set is kept.
anyexperts_threads_per_rank() {
  local per_task="$1"
  if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    echo "threads per rank: $OMP_NUM_THREADS (OMP_NUM_THREADS set when submitting)"
  elif [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / per_task))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
    echo "threads per rank: $OMP_NUM_THREADS (SLURM_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK for $per_task rank(s) per task)"
  else
    echo "threads per rank: torch's default (no --cpus-per-task, no OMP_NUM_THREADS)"
  fi
}

ANYEXPERTS_GOT_TIME_SIGNAL=0

# `#SBATCH --signal=B:USR1@120` sends USR1 to this shell only, 120 s before the time limit.
# Neither srun's tasks nor torchrun's workers see it, so pass it on as SIGTERM (which
# torchrun forwards, and which preemption sends anyway): `scancel --signal` without
# --batch/--full reaches every step of the job but not this shell.
_anyexperts_on_time_signal() {
  ANYEXPERTS_GOT_TIME_SIGNAL=1
  echo "[$(date '+%F %T')] time limit near: sending SIGTERM to the steps of job $SLURM_JOB_ID" >&2
  scancel --signal=TERM "$SLURM_JOB_ID" || echo "scancel failed; the step runs until the time limit" >&2
}

# scancel or preemption: Slurm has signalled the steps itself; keep waiting for them so that
# their checkpoint is not cut short by this shell exiting first.
_anyexperts_on_term() {
  echo "[$(date '+%F %T')] batch shell got SIGTERM; waiting for the step to finish" >&2
}

# anyexperts_run_step srun ...: runs the step in the background so that this shell can take
# signals meanwhile, returns the step's exit status, and requeues the job when the
# time-limit signal came (unless REQUEUE_FROM_BATCH=0).
anyexperts_run_step() {
  trap _anyexperts_on_time_signal USR1
  trap _anyexperts_on_term TERM
  "$@" &
  local step_pid=$! status=0
  # A trapped signal interrupts `wait` while the step still runs: wait again until it is
  # gone. bash keeps the status of its finished children, so the last `wait` reports the
  # step's own exit status, not the signal's 128+n.
  while kill -0 "$step_pid" 2>/dev/null; do
    wait "$step_pid" || true
  done
  wait "$step_pid" || status=$?
  trap - USR1 TERM
  echo "[$(date '+%F %T')] step exited with status $status" >&2
  if ((ANYEXPERTS_GOT_TIME_SIGNAL)) && [[ "${REQUEUE_FROM_BATCH:-1}" == 1 ]]; then
    # Same job id, same RUN_DIR: the next start resumes from the latest checkpoint.
    echo "[$(date '+%F %T')] requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed; resubmit by hand" >&2
  fi
  return "$status"
}
