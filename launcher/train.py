"""The one training entry point: `python -m launcher.train [Hydra overrides]`.

    python -m launcher.train experiment=shakespeare_cpu parallel.expert_model_parallel_size=1
    NPROC=2 launcher/run_local.sh experiment=shakespeare_cpu          # torchrun, one node
    srun python -m launcher.train experiment=gpt_1b_gpu               # Slurm, a task per GPU
    mpirun -np 2 python -m launcher.train experiment=shakespeare_cpu  # MPI (mpi4py bootstrap)

Order of work: compose the config (Hydra, typed by anyexperts/config.py) -> find this
process's rank (launcher/bootstrap.py) -> validate every value against the world size,
before any process group exists -> start torch.distributed -> agree on one run directory
for all ranks and write the resolved config into it -> train.

Exit codes (of each rank's process; under torchrun see the note below):
  0   finished trainer.max_steps (or trainer.eval_only), final checkpoint saved.
  75  stopped on SIGTERM / SIGUSR1 / SIGINT after saving a checkpoint (EX_TEMPFAIL: run
      the same command again, with the same run directory, to resume). With
      trainer.requeue_on_signal=true and SLURM_JOB_ID set, rank 0 has already run
      `scontrol requeue $SLURM_JOB_ID`.
  2   config error (before any process group starts); the message names the field.
  1   any other error; the traceback names it (under torchrun, the failing rank's, via
      `record`; torchrun then stops the other ranks).
torchrun itself exits 1 when it was signalled (it re-raises the signal after its workers
stop, whatever their codes), and 1 with a failure report when a worker failed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from anyexperts.config import TrainConfig, register_configs, to_dataclass, validate, validate_device
from launcher import bootstrap
from launcher.threads import apply_thread_count

# --- checkpoint / preemption (issue 5) ---
# Exit code after a stop signal and its checkpoint: EX_TEMPFAIL ("try again"), distinct from a
# crash (1) and a config error (2), so a wrapper script can tell "resume me" from "broken".
EXIT_STOPPED_ON_SIGNAL = 75


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue <job_id>`: the job goes back to pending with the same id (and so the
    same run directory) and resumes from its checkpoint when it starts again."""
    import subprocess

    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"scontrol requeue {job_id} failed ({err}); resubmit the job by hand", file=sys.stderr, flush=True)
        return False
    if done.returncode != 0:
        print(f"scontrol requeue {job_id} exited {done.returncode}: {done.stderr.strip()}; resubmit by hand",
              file=sys.stderr, flush=True)
        return False
    print(f"requeued Slurm job {job_id}", flush=True)
    return True
# --- end checkpoint / preemption ---

register_configs()


def choose_run_dir(cfg: TrainConfig, env: bootstrap.DistEnv) -> Path:
    """One directory for all ranks: experiment.run_dir, or <run_root>/<name>/<id> picked by rank 0."""
    if cfg.experiment.run_dir:
        path = Path(cfg.experiment.run_dir)
    else:
        job_id = os.environ.get("SLURM_JOB_ID")
        run_id = f"slurm-{job_id}" if job_id else time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.experiment.run_root) / cfg.experiment.name / run_id
    chosen = [str(path.resolve())]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def write_resolved_config(cfg_node: DictConfig, run_dir: Path, env: bootstrap.DistEnv) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg_node, resolve=True)
    (run_dir / "config.yaml").write_text(resolved)
    meta = {"world_size": env.world_size, "launcher": env.launcher, "argv": sys.argv[1:]}
    (run_dir / "launch.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(meta)))


def quiet_megatron() -> None:
    """megatron-core logs every parameter and its whole optimizer config at INFO, and warns
    once per module that apex/TE are missing, which is the expected state on CPU."""
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        for pattern in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                        ".*full scope is deprecated.*"):
            warnings.filterwarnings("ignore", message=pattern)
    # megatron's checkpoint code still calls the older collective name (torch 2.13 renamed it).
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated.*", category=FutureWarning)


def run(cfg_node: DictConfig) -> float | None:
    quiet_megatron()
    cfg = to_dataclass(cfg_node)
    env = bootstrap.discover()
    try:
        validate(cfg, env.world_size)
        validate_device(cfg, cuda_available=torch.cuda.is_available())
        # torchrun's workers share the CPUs of their one srun task; an srun task per rank does not.
        print(apply_thread_count(rank=env.rank,
                                 processes_per_task=env.local_world_size if env.launcher == "torchrun" else 1),
              flush=True)
    except ValueError as err:
        # Before any process group: every rank fails the same way, with the field named.
        print(f"config error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    bootstrap.export_env(env)
    bootstrap.init_process_group(env, cfg.parallel.backend, cfg.parallel.timeout_minutes)
    try:
        run_dir = choose_run_dir(cfg, env)
        if env.rank == 0:
            write_resolved_config(cfg_node, run_dir, env)
            print(f"run directory: {run_dir}", flush=True)
        from anyexperts.training.trainer import train

        result = train(cfg, run_dir)
        if env.rank == 0 and result.losses:
            print(f"done: {result.steps_done} steps in {result.wall_time_s:.1f}s, "
                  f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}", flush=True)
        # --- checkpoint / preemption (issue 5) ---
        if result.stop_signal:
            job_id = os.environ.get("SLURM_JOB_ID")
            if env.rank == 0 and cfg.trainer.requeue_on_signal and job_id:
                # After train(): the checkpoint is complete on every rank (its save ends in a collective).
                requeue_slurm_job(job_id)
            # Exit together: torchrun stops the remaining ranks as soon as one has exited.
            dist.barrier()
            # The checkpoint is complete and every rank is on its way out with 75. srun's
            # --kill-on-bad-exit counts the first rank's 75 as a failure and sends SIGTERM to the
            # others, which would turn their 75 into 143 and the step's status with them; ignore
            # it now (SIGKILL still follows after Slurm's KillWait should a rank hang).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            # Raised inside the try: the finally below still tears down the process groups.
            raise SystemExit(EXIT_STOPPED_ON_SIGNAL)
        # --- end checkpoint / preemption ---
        return result.losses[-1] if result.losses else None
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg_node: DictConfig) -> float | None:
    from torch.distributed.elastic.multiprocessing.errors import record

    # record() must sit inside Hydra: Hydra turns an exception into sys.exit(1), so a record()
    # around main() alone never sees it, and torchrun's failure report would say
    # "error_file: <N/A>" instead of showing the failing rank's traceback. (issue 5)
    return record(run)(cfg_node)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: under torchrun, a failing rank's traceback becomes the job's error report.
    record(main)()
