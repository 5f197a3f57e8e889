"""The launch scripts: slurm/*.sbatch, slurm/_env.sh, launcher/run_local.sh, and the submitit launcher config.

    .venv/bin/python -m pytest -q tests/test_slurm_templates.py

No Slurm is needed: the batch scripts run under bash with faked SLURM_* variables and
stand-ins for srun, scancel and scontrol that record how they were called.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher.bootstrap import discover, first_host
from launcher.threads import apply_thread_count, choose_thread_count

REPO_ROOT = Path(__file__).resolve().parents[1]
SBATCH_FILES = sorted((REPO_ROOT / "slurm").glob("*.sbatch"))
SHELL_FILES = SBATCH_FILES + sorted((REPO_ROOT / "slurm").glob("*.sh")) + [REPO_ROOT / "launcher" / "run_local.sh"]
SUBMITIT_YAML = REPO_ROOT / "conf" / "hydra" / "launcher" / "submitit_slurm.yaml"

JOB_ID = "4242"
NODELIST = "node[07-08],gpu-a[1-2]"

# Every field of hydra-submitit-launcher 1.2.0's SlurmQueueConf (BaseQueueConf included).
SLURM_QUEUE_CONF_FIELDS = {
    "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
    "nodes", "name", "stderr_to_stdout", "_target_", "partition", "qos", "comment", "constraint",
    "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account",
    "signal_delay_s", "max_num_timeout", "additional_parameters", "array_parallelism", "setup",
}


def slurm_free_env(**extra: str) -> dict[str, str]:
    """This environment without Slurm's or a launcher's variables, plus `extra`."""
    env = {key: value for key, value in os.environ.items()
           if not re.match(r"^(SLURM_|SRUN_|MASTER_ADDR$|MASTER_PORT$|RUN_DIR$|RUN_NAME$|RUN_ROOT$)", key)}
    env.update(extra)
    return env


def batch_shell_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What Slurm gives a batch shell of job 4242 on 2 nodes, with runs/ under tmp_path."""
    shell = dict(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST=NODELIST, SLURM_JOB_NAME="moe-test", SLURM_NNODES="2",
                 SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=str(REPO_ROOT),
                 RUN_ROOT=str(tmp_path / "runs"))
    return slurm_free_env(**{**shell, **extra})


def source_env_sh(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    script = f'source "{REPO_ROOT}/slurm/_env.sh" && env'
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


# ----------------------------------------------------------------------------- syntax and headers


def test_there_are_scripts_to_check():
    assert {path.name for path in SBATCH_FILES} >= {"pretrain_srun.sbatch", "pretrain_torchrun.sbatch"}


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda path: path.name)
def test_shell_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_run_local_is_executable():
    assert os.access(REPO_ROOT / "launcher" / "run_local.sh", os.X_OK)


def sbatch_directives(path: Path) -> list[str]:
    """The #SBATCH lines sbatch reads: it stops at the first line that is neither a comment nor blank."""
    directives = []
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            directives.append(stripped[len("#SBATCH"):].strip())
    return directives


@pytest.mark.parametrize("path", SBATCH_FILES, ids=lambda path: path.name)
def test_sbatch_header_has_signal_requeue_and_append(path):
    directives = sbatch_directives(path)
    every_sbatch_line = [line for line in path.read_text().splitlines() if line.strip().startswith("#SBATCH")]
    assert len(directives) == len(every_sbatch_line), "an #SBATCH line after the first command is ignored by sbatch"
    signal_values = [d.split("=", 1)[1] for d in directives if d.startswith("--signal=")]
    assert len(signal_values) == 1 and re.fullmatch(r"(B:)?(USR1|USR2|TERM)@\d+", signal_values[0])
    assert "--requeue" in directives
    assert "--open-mode=append" in directives
    assert any(d.startswith("--output=") for d in directives)


# ----------------------------------------------------------------------------- slurm/_env.sh


def test_env_sh_derives_rendezvous_and_run_dir(tmp_path):
    exported = source_env_sh(tmp_path, batch_shell_env(tmp_path))
    run_dir = tmp_path / "runs" / "moe-test" / f"slurm-{JOB_ID}"
    assert exported["MASTER_ADDR"] == "node07"
    assert exported["MASTER_PORT"] == str(10000 + int(JOB_ID) % 20000)
    assert exported["RUN_DIR"] == str(run_dir)
    assert exported["LOG_DIR"] == str(run_dir / "logs") and (run_dir / "logs").is_dir()
    assert exported["SRUN_CPUS_PER_TASK"] == "8"


def test_env_sh_and_bootstrap_agree_on_the_rendezvous(tmp_path):
    exported = source_env_sh(tmp_path, batch_shell_env(tmp_path))
    # What one srun task of the same job finds by itself, without the exported MASTER_*.
    task = discover({"SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": NODELIST, "SLURM_STEP_ID": "0",
                     "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "16",
                     "SLURM_STEP_TASKS_PER_NODE": "8(x2)"})
    assert (task.master_addr, str(task.master_port)) == (exported["MASTER_ADDR"], exported["MASTER_PORT"])


@pytest.mark.parametrize("hostlist", ["node07", "node[01-03,07],gpu-a[1-2]", "r[2-3]n[08-09],x1",
                                      "gpu-b[010-012]", "login1,node[1-2]"])
def test_env_sh_first_host_matches_the_python_expander(tmp_path, hostlist):
    exported = source_env_sh(tmp_path, batch_shell_env(tmp_path, SLURM_JOB_NODELIST=hostlist))
    assert exported["MASTER_ADDR"] == first_host(hostlist)


def test_env_sh_keeps_user_overrides(tmp_path):
    env = batch_shell_env(tmp_path, MASTER_ADDR="node07-ib", MASTER_PORT="23456", RUN_DIR=str(tmp_path / "mine"))
    exported = source_env_sh(tmp_path, env)
    assert (exported["MASTER_ADDR"], exported["MASTER_PORT"]) == ("node07-ib", "23456")
    assert exported["RUN_DIR"] == str(tmp_path / "mine")


def test_env_sh_outside_slurm_says_to_use_sbatch(tmp_path):
    result = subprocess.run(["bash", "-c", f'source "{REPO_ROOT}/slurm/_env.sh"'], cwd=tmp_path,
                            env=slurm_free_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "sbatch" in result.stderr


# ----------------------------------------------------------------------------- threads per rank


def test_thread_count_takes_omp_num_threads_then_slurm_cpus_per_task():
    both = {"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "8"}
    assert choose_thread_count(both, processes_per_task=1) == (3, "OMP_NUM_THREADS=3")
    assert choose_thread_count({"SLURM_CPUS_PER_TASK": "8"}, processes_per_task=1) == (8, "SLURM_CPUS_PER_TASK=8")
    # torchrun's workers share their task's CPUs, and each keeps at least one thread.
    assert choose_thread_count({"SLURM_CPUS_PER_TASK": "8"}, processes_per_task=4) == (
        2, "SLURM_CPUS_PER_TASK=8 shared by 4 processes")
    assert choose_thread_count({"SLURM_CPUS_PER_TASK": "2"}, processes_per_task=4)[0] == 1
    threads, source = choose_thread_count({}, processes_per_task=1)
    assert threads is None and "torch's default" in source


@pytest.mark.parametrize("key", ["OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"])
def test_thread_count_names_a_bad_variable(key):
    with pytest.raises(ValueError, match=f"{key}='0'"):
        choose_thread_count({key: "0"}, processes_per_task=1)


def test_apply_thread_count_sets_torch_and_exports_the_count():
    import torch

    before = torch.get_num_threads()
    environ = {"SLURM_CPUS_PER_TASK": "1"}
    try:
        line = apply_thread_count(rank=3, processes_per_task=1, environ=environ)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert line == "rank 3: 1 torch threads (SLURM_CPUS_PER_TASK=1)"
    assert environ["OMP_NUM_THREADS"] == "1", "processes the rank starts follow it"


@pytest.mark.parametrize("preset, per_task, expected", [(None, 1, "8"), (None, 3, "2"), ("5", 4, "5")])
def test_env_sh_threads_per_rank_divides_the_task_cpus_unless_set(tmp_path, preset, per_task, expected):
    env = batch_shell_env(tmp_path)  # SLURM_CPUS_PER_TASK=8
    env.pop("OMP_NUM_THREADS", None)
    if preset:
        env["OMP_NUM_THREADS"] = preset
    script = f'source "{REPO_ROOT}/slurm/_env.sh" && anyexperts_threads_per_rank {per_task} && echo "OMP=$OMP_NUM_THREADS"'
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"OMP={expected}"
    assert result.stdout.startswith(f"threads per rank: {expected} (")


# ----------------------------------------------------------------------------- whole batch scripts, fake Slurm

FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
printf '%s\\n' "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset}" > "$FAKE_LOG/srun.shutdown_timeout"
if [[ "${FAKE_SRUN_RUNS_UNTIL_SIGNALLED:-0}" == 1 ]]; then
  trap 'echo TERM >> "$FAKE_LOG/srun.signals"; kill "$sleeper" 2>/dev/null; exit 143' TERM
  sleep 60 & sleeper=$!
  echo $$ > "$FAKE_LOG/srun.pid.tmp" && mv "$FAKE_LOG/srun.pid.tmp" "$FAKE_LOG/srun.pid"
  wait "$sleeper"
fi
exit 0
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scancel.calls"
kill -TERM "$(cat "$FAKE_LOG/srun.pid")"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """Stand-ins for srun, scancel and scontrol on PATH; returns (environment, log folder)."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "fake_log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = batch_shell_env(tmp_path, FAKE_LOG=str(log_dir), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                          ANYEXPERTS_DIR=str(REPO_ROOT), PYTHON=sys.executable)
    return env, log_dir


def run_batch_script(name: str, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "slurm" / name), *overrides], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_srun_template_starts_one_train_per_task_with_pinned_run_dir(fake_slurm, tmp_path):
    env, log_dir = fake_slurm
    result = run_batch_script("pretrain_srun.sbatch", env, "experiment=tiny", "optim.lr=3e-4")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "moe-test" / f"slurm-{JOB_ID}"
    args = (log_dir / "srun.args").read_text().splitlines()
    assert f"--output={run_dir}/logs/rank-%t.log" in args and "--open-mode=append" in args
    assert args[args.index("-m") + 1] == "launcher.train"
    assert args[-3:] == [f"experiment.run_dir={run_dir}", "experiment=tiny", "optim.lr=3e-4"]
    assert not (log_dir / "scontrol.calls").exists(), "no requeue without the time-limit signal"


@pytest.mark.parametrize("script", ["pretrain_srun.sbatch", "pretrain_torchrun.sbatch"])
def test_templates_pass_extra_overrides_and_srun_options(fake_slurm, script):
    env, log_dir = fake_slurm
    env["EXTRA_OVERRIDES"] = "trainer.max_steps=10 logging.console=false"
    env["SRUN_EXTRA_ARGS"] = "--container-image=/img.sqsh --container-workdir=/w"
    result = run_batch_script(script, env, "experiment=tiny")
    assert result.returncode == 0, result.stderr
    args = (log_dir / "srun.args").read_text().splitlines()
    assert args[-3:] == ["trainer.max_steps=10", "logging.console=false", "experiment=tiny"]
    python_at = args.index(sys.executable)
    assert args[python_at - 2:python_at] == ["--container-image=/img.sqsh", "--container-workdir=/w"]


def test_time_limit_signal_becomes_sigterm_for_the_step_then_requeue(fake_slurm):
    env, log_dir = fake_slurm
    env["FAKE_SRUN_RUNS_UNTIL_SIGNALLED"] = "1"
    batch = subprocess.Popen(["bash", str(REPO_ROOT / "slurm" / "pretrain_srun.sbatch"), "experiment=tiny"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (log_dir / "srun.pid").exists():
            assert time.monotonic() < deadline and batch.poll() is None, "the fake srun step never started"
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
        stdout, stderr = batch.communicate(timeout=30)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 143, stdout + stderr  # the step's own status, passed through
    assert (log_dir / "scancel.calls").read_text().split() == ["--signal=TERM", JOB_ID]
    assert (log_dir / "srun.signals").read_text().split() == ["TERM"]
    assert (log_dir / "scontrol.calls").read_text().split() == ["requeue", JOB_ID]


def test_torchrun_template_starts_one_torchrun_per_node(fake_slurm, tmp_path):
    env, log_dir = fake_slurm
    result = run_batch_script("pretrain_torchrun.sbatch", env, "experiment=tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "moe-test" / f"slurm-{JOB_ID}"
    args = (log_dir / "srun.args").read_text().splitlines()
    assert "--ntasks-per-node=1" in args
    torchrun_args = args[args.index("torch.distributed.run") + 1:]
    for expected in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=node07:{10000 + int(JOB_ID) % 20000}", f"--rdzv-id={JOB_ID}",
                     f"--log-dir={run_dir}/logs/torchrun", "--tee=3"):
        assert expected in torchrun_args
    assert torchrun_args[torchrun_args.index("-m") + 1] == "launcher.train"
    assert torchrun_args[-2:] == [f"experiment.run_dir={run_dir}", "experiment=tiny"]
    # Workers get this long to save after torchrun forwards SIGTERM; it must fit in --signal's 120 s.
    assert int((log_dir / "srun.shutdown_timeout").read_text()) < 120


# ----------------------------------------------------------------------------- launcher/run_local.sh

# A PYTHON for run_local.sh that runs the bootstrap self-test where launcher.train would run:
# torchrun starts its workers with this same interpreter wrapper's real python.
PYTHON_SHIM = """#!/usr/bin/env bash
args=()
for arg in "$@"; do
  if [[ "$arg" == launcher.train ]]; then args+=(launcher.bootstrap --selftest); break; fi
  args+=("$arg")
done
exec "{python}" "${{args[@]}}"
"""


@pytest.mark.slow
def test_run_local_shows_rank_zero_and_logs_every_rank(tmp_path):
    shim = tmp_path / "python"
    shim.write_text(PYTHON_SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    run_dir = tmp_path / "run"
    env = slurm_free_env(NPROC="2", PYTHON=str(shim), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOG_DIR", "LOG_RANKS"):
        env.pop(key, None)
    result = subprocess.run([str(REPO_ROOT / "launcher" / "run_local.sh"), f"experiment.run_dir={run_dir}"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    console = [line for line in (result.stdout + result.stderr).splitlines() if "launcher=torchrun" in line]
    assert len(console) == 1 and console[0].endswith("rank=0 world=2 sum=1 launcher=torchrun")
    rank_logs = sorted((run_dir / "torchrun_logs").rglob("stdout.log"))
    assert len(rank_logs) == 2
    assert "rank=1 world=2 sum=1 launcher=torchrun" in "".join(path.read_text() for path in rank_logs)


# ----------------------------------------------------------------------------- submitit launcher config


def test_submitit_yaml_matches_slurm_queue_conf():
    assert SUBMITIT_YAML.read_text().startswith("# @package hydra.launcher\n")
    config = OmegaConf.load(SUBMITIT_YAML)
    assert set(config.keys()) == SLURM_QUEUE_CONF_FIELDS
    assert config._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    for key in ("timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task",
                "signal_delay_s", "max_num_timeout"):
        assert isinstance(config[key], int), key
    assert config.tasks_per_node == config.gpus_per_node, "one Slurm task per GPU"
    assert config.signal_delay_s >= 60


def test_submitit_yaml_matches_the_installed_plugin_when_there_is_one():
    plugin = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config",
                                 reason="hydra-submitit-launcher is an optional extra: pip install -e '.[slurm]'")
    schema = OmegaConf.structured(plugin.SlurmQueueConf)
    assert set(OmegaConf.load(SUBMITIT_YAML).keys()) == set(schema.keys())
    OmegaConf.merge(schema, OmegaConf.load(SUBMITIT_YAML))  # raises on a wrongly typed value


def test_submitit_yaml_composes_as_hydra_launcher_with_overrides(tmp_path):
    from hydra import compose, initialize_config_dir

    (tmp_path / "config.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        config = compose(config_name="config", return_hydra_config=True,
                         overrides=[f"hydra.searchpath=[file://{REPO_ROOT / 'conf'}]",
                                    "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                                    "hydra.launcher.partition=gpu"])
    assert (config.hydra.launcher.nodes, config.hydra.launcher.partition) == (2, "gpu")
    assert config.hydra.launcher.tasks_per_node == 8
