"""The one training entry point: `python -m launcher.train [Hydra overrides]`.

    python -m launcher.train experiment=shakespeare_cpu parallel.expert_model_parallel_size=1
    NPROC=2 launcher/run_local.sh experiment=shakespeare_cpu          # torchrun, one node
    srun python -m launcher.train experiment=gpt_1b_gpu               # Slurm, a task per GPU
    mpirun -np 2 python -m launcher.train experiment=shakespeare_cpu  # MPI (mpi4py bootstrap)

Order of work: compose the config (Hydra, typed by anyexperts/config.py) -> find this
process's rank (launcher/bootstrap.py) -> validate every value against the world size,
before any process group exists -> start torch.distributed -> agree on one run directory
for all ranks and write the resolved config into it -> train.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from anyexperts.config import TrainConfig, register_configs, to_dataclass, validate
from launcher import bootstrap

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


def run(cfg_node: DictConfig) -> float | None:
    quiet_megatron()
    cfg = to_dataclass(cfg_node)
    env = bootstrap.discover()
    try:
        validate(cfg, env.world_size)
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
        return result.losses[-1] if result.losses else None
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg_node: DictConfig) -> float | None:
    return run(cfg_node)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: under torchrun, a failing rank's traceback becomes the job's error report.
    record(main)()
