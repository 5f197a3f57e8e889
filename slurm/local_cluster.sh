#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try the batch scripts and the submitit sweeps
# where there is no real cluster (and for tests/test_slurm_local.py).
#
#   sudo slurm/local_cluster.sh start    # install if missing, configure, start, wait until the node is idle
#   slurm/local_cluster.sh status        # daemons, node state, queue; exit 0 only when all are up
#   sudo slurm/local_cluster.sh stop     # cancel the jobs, stop every daemon (slurmstepd included)
#
# start installs Debian's slurmctld, slurmd, slurm-client and munge with apt-get when
# slurmctld, slurmd, sbatch or munged is missing, creates a munge key if there is none,
# writes a one-node /etc/slurm/slurm.conf for this host (all its CPUs, no GPUs), and starts
# munged, slurmctld and slurmd. Both start and stop are idempotent: what already runs is
# left running, what is already stopped stays stopped.
#
# Slurm's state (the job id counter included) is kept in /var/lib/slurm between starts, so
# job ids keep growing and a new job never lands in the runs/<name>/slurm-<id> folder of
# an older one, which it would take for its own and resume.
#
# Environment: LOCAL_SLURM_CPUS (default: the CPUs this process may use), LOCAL_SLURM_WAIT_S (default 90: how long
# start waits for the node to become idle).

set -euo pipefail

NODE="$(hostname -s)"
# Not plain nproc: it reports OMP_NUM_THREADS instead of the CPUs when that is set.
CPUS="${LOCAL_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
WAIT_S="${LOCAL_SLURM_WAIT_S:-90}"
CONF=/etc/slurm/slurm.conf
# The first line of every slurm.conf this script writes: a file without it belongs to
# someone else and is never overwritten.
MARKER="# Written by AnyExperts slurm/local_cluster.sh: a one-node cluster on this machine."
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }
# Exit 69 (EX_UNAVAILABLE): Slurm cannot be had on this machine at all (no root, no apt, no
# package mirror), as opposed to a cluster that was installed but does not come up (exit 1).
unavailable() { echo "local_cluster: unavailable: $*" >&2; exit 69; }

need_root() {
  [[ "$(id -u)" == 0 ]] || unavailable "'$1' needs root (it installs packages and runs the daemons as root, SlurmUser=root); run: sudo $0 $1"
}

# The pid in pid file $1 when that process is alive, else nothing.
live_pid() {
  local pid
  [[ -r "$1" ]] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_packages() {
  local tool missing=0
  for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null || missing=1
  done
  ((missing)) || return 0
  command -v apt-get >/dev/null || unavailable "Slurm is not installed and there is no apt-get; install ${PACKAGES[*]} by hand"
  say "installing ${PACKAGES[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || unavailable "apt-get update failed (no network or no package mirror?)"
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || unavailable "apt-get install ${PACKAGES[*]} failed"
}

start_munge() {
  if [[ ! -s "$MUNGE_KEY" ]]; then
    say "creating $MUNGE_KEY"
    mkdir -p /etc/munge
    mungekey --create --keyfile="$MUNGE_KEY" --force
  fi
  # munged refuses keys and directories that other users can read or write.
  chown munge:munge "$MUNGE_KEY" /etc/munge && chmod 0400 "$MUNGE_KEY" && chmod 0700 /etc/munge
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if ! live_pid "$MUNGE_PID" >/dev/null; then
    say "starting munged"
    runuser -u munge -- munged
  fi
  munge -n | unmunge >/dev/null || die "munged does not answer (log: /var/log/munge/munged.log)"
}

render_conf() {
  # Memory as slurmd measures it: a larger RealMemory would drain the node.
  local mem_mb
  mem_mb="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  cat <<EOF
$MARKER
# Rewritten by every 'local_cluster.sh start'; edit the script, not this file.
ClusterName=anyexperts-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No cgroups: linuxproc finds a job's processes by parentage, task/none pins nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# The node as configured here, whatever slurmd detects (sockets, threads).
SlurmdParameters=config_overrides
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or out of time.
KillWait=30
# Finished jobs stay visible to scontrol show job this long (there is no accounting).
MinJobAge=600
NodeName=$NODE NodeAddr=$NODE CPUs=$CPUS RealMemory=${mem_mb:-1} State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_conf() {
  local new
  new="$(render_conf)"
  if [[ -e "$CONF" ]] && [[ "$(head -n1 "$CONF")" != "$MARKER" ]]; then
    die "$CONF exists and was not written by this script; move it away to use the local cluster"
  fi
  if [[ -e "$CONF" ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
    return 0
  fi
  if live_pid "$CTLD_PID" >/dev/null || live_pid "$SLURMD_PID" >/dev/null; then
    say "the configuration changed: restarting the Slurm daemons"
    stop_slurm_daemons
  fi
  mkdir -p /etc/slurm
  printf '%s\n' "$new" >"$CONF"
  say "wrote $CONF (NodeName=$NODE CPUs=$CPUS)"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

start() {
  need_root start
  install_packages
  start_munge
  write_conf
  mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"
  if ! live_pid "$CTLD_PID" >/dev/null; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start (log: $LOG_DIR/slurmctld.log)"
  fi
  if ! live_pid "$SLURMD_PID" >/dev/null; then
    say "starting slurmd"
    slurmd -N "$NODE" || die "slurmd did not start (log: $LOG_DIR/slurmd.log)"
  fi
  local deadline=$((SECONDS + WAIT_S)) state=""
  while ((SECONDS < deadline)); do
    state="$(node_state)"
    case "$state" in
      idle|mixed|allocated|completing) say "node $NODE is $state"; return 0 ;;
      # A node that was down when slurmctld last stopped stays down until told otherwise.
      down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
  done
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  die "node $NODE is '${state:-unknown}' after ${WAIT_S}s, not idle (logs above; raise LOCAL_SLURM_WAIT_S if it is slow)"
}

# wait_gone PID...: waits up to 30 s for the processes to exit; returns 1 if some remain.
wait_gone() {
  local pid deadline=$((SECONDS + 30)) alive
  while :; do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

stop_slurm_daemons() {
  local pids=() pid
  for pid in "$(live_pid "$SLURMD_PID")" "$(live_pid "$CTLD_PID")"; do
    [[ -n "$pid" ]] && pids+=("$pid")
  done
  ((${#pids[@]})) || return 0
  say "stopping slurmd and slurmctld (${pids[*]})"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait_gone "${pids[@]}" || { kill -KILL "${pids[@]}" 2>/dev/null || true; wait_gone "${pids[@]}" || true; }
}

stop() {
  need_root stop
  if live_pid "$CTLD_PID" >/dev/null; then
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs || true
      local deadline=$((SECONDS + 60))
      while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]] && ((SECONDS < deadline)); do sleep 1; done
    fi
  fi
  stop_slurm_daemons
  # slurmstepd outlives slurmd by design (a restarted slurmd finds its steps again); with
  # the cluster gone there is nothing left for them to report to.
  local steps
  steps="$(pgrep -x slurmstepd | tr '\n' ' ' || true)"
  if [[ -n "${steps// /}" ]]; then
    say "ending leftover slurmstepd $steps"
    # shellcheck disable=SC2086
    kill -KILL $steps 2>/dev/null || true
  fi
  local pid
  if pid="$(live_pid "$MUNGE_PID")"; then
    say "stopping munged ($pid)"
    kill -TERM "$pid"
    wait_gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
  fi
  say "stopped"
}

status() {
  local ok=0 name pidfile pid
  for name in munged slurmctld slurmd; do
    case "$name" in
      munged) pidfile="$MUNGE_PID" ;;
      slurmctld) pidfile="$CTLD_PID" ;;
      slurmd) pidfile="$SLURMD_PID" ;;
    esac
    if pid="$(live_pid "$pidfile")"; then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"
      ok=3
    fi
  done
  if ((ok == 0)); then
    echo "node $NODE: $(node_state)"
    squeue -o '%.8i %.12j %.10T %.10M %R' || ok=3
  fi
  return "$ok"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
