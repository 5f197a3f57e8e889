"""What checkpoint checksums cost, and whether memory grows over a long run (JSON + printed table).

Three measurements, each optional:
- synthetic: a checkpoint of --synthetic-mib MiB (8 shard files, 2 writer ranks) written with
  fsync; then the SHA-256 time the save adds (each writer hashes its files, writers in
  parallel threads as the ranks run in parallel) and the time the load adds (the files dealt
  out to 2 ranks by size, likewise in parallel). Files are page-cache hot, as right after a
  save; a cold read at load adds the disk's read time.
- checkpoint: the same two hashing times for an existing checkpoint (--checkpoint DIR, e.g.
  the main job's <run_dir>/checkpoints/step_0000150).
- rss: one 2-process main-job run (experiment=shakespeare_cpu, torchrun, CPU) of --rss-steps
  steps, validating and checkpointing every 100, so that by step 100 each worker has done
  every kind of work once (training, validation, save). Each worker's peak RSS (VmHWM) and
  current RSS (VmRSS) are read from /proc once step 100's validation and save are done and
  again at the end (the current RSS also every 100 steps, to show a trend rather than two
  points); the save log lines give the save time and its checksum part. Extra overrides for
  that run follow `--`.

    OMP_NUM_THREADS=1 python tools/bench_checkpoint.py --json bench_checkpoint.json
    python tools/bench_checkpoint.py --synthetic-mib 0 --rss-steps 2000 -- model.num_layers=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anyexperts.training import checkpoint_files as files  # noqa: E402

_SAVE_LINE = re.compile(r"saved checkpoint (\S+) \(([\d.]+) MiB in ([\d.]+)s, checksums ([\d.]+)s\)")


def _in_parallel(jobs) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        list(pool.map(lambda job: job(), jobs))
    return time.perf_counter() - start


def hashing_times(ckpt_dir: Path, world_size: int = 2) -> dict:
    """Seconds SHA-256 adds to a save (writers hash their own files) and to a load (shares by size)."""
    names = files.checkpoint_file_names(ckpt_dir)
    sizes = {name: (ckpt_dir / name).stat().st_size for name in names}
    writers = [files.files_written_by(names, rank, world_size) for rank in range(world_size)]
    save_s = _in_parallel([lambda mine=mine: files.file_entries(ckpt_dir, mine) for mine in writers])
    shares = files.split_by_size(sizes, world_size)
    load_s = _in_parallel([lambda share=share: files.file_entries(ckpt_dir, share) for share in shares])
    one_rank_s = _in_parallel([lambda: files.file_entries(ckpt_dir, names)])
    mib = sum(sizes.values()) / 2**20
    return {"path": str(ckpt_dir), "mib": round(mib, 1), "files": len(names), "ranks": world_size,
            "save_checksum_s": round(save_s, 3), "load_verify_s": round(load_s, 3),
            "one_rank_hash_s": round(one_rank_s, 3), "one_rank_mib_per_s": round(mib / one_rank_s, 1)}


def synthetic(mib: int, work_dir: Path) -> dict:
    ckpt_dir = work_dir / "synthetic" / "step_0000001"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    per_file = mib * 2**20 // 8
    block = os.urandom(min(per_file, 16 * 2**20))
    start = time.perf_counter()
    for index in range(8):
        with open(ckpt_dir / f"__{index % 2}_{index // 2}.distcp", "wb") as f:
            written = 0
            while written < per_file:
                chunk = block[: per_file - written]
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    result = {"kind": f"synthetic {mib} MiB", "write_fsync_s": round(write_s, 3), **hashing_times(ckpt_dir)}
    shutil.rmtree(ckpt_dir.parent)
    return result


def _vm_mib(pid: int) -> dict[str, float]:
    """{"hwm": VmHWM, "rss": VmRSS} of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key[2:].lower()] = int(value.split()[0]) / 1024
    if len(fields) != 2:
        raise RuntimeError(f"no VmHWM/VmRSS for pid {pid}")
    return fields


def _worker_pids(agent_pid: int, num_workers: int) -> list[int]:
    """The workers' pids in rank order; empty until all of them have started."""
    import psutil

    workers = [p for p in psutil.Process(agent_pid).children(recursive=True)
               if "launcher.train" in " ".join(p.cmdline())]
    if len(workers) != num_workers:
        return []

    def rank(process) -> int:
        return int(process.environ().get("RANK", "0"))

    return [p.pid for p in sorted(workers, key=rank)]


def _last_step(metrics: Path) -> int:
    step = 0
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                step = max(step, record["step"])
    return step


def rss_run(steps: int, work_dir: Path, overrides: list[str], first: int = 100, num_workers: int = 2) -> dict:
    import psutil

    run_dir = work_dir / "rss_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_workers),
           "-m", "launcher.train", "experiment=shakespeare_cpu", f"trainer.max_steps={steps}",
           f"trainer.eval_interval={first}", "trainer.routing_trace_at_end=false", "logging.log_interval=10",
           "logging.tensorboard=false", f"checkpoint.interval={first}", "checkpoint.keep_last=2",
           f"experiment.run_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log_path = work_dir / "rss_run.log"
    start = time.monotonic()
    # Sampled once the step after `first` is logged: step `first`'s validation and save are done.
    first_sample_step = first + 10
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        first_sample: list[dict] = []
        last_sample: list[dict] = []
        rss_by_step: dict[int, list[float]] = {}
        pids: list[int] = []
        while proc.poll() is None:
            time.sleep(0.5)
            try:
                pids = pids or _worker_pids(proc.pid, num_workers)
                if not pids:
                    continue
                step = _last_step(run_dir / "metrics.jsonl")
                if step < first_sample_step:
                    continue
                sample = [_vm_mib(pid) for pid in pids]
                if not first_sample:
                    first_sample = sample
                last_sample = sample  # the last one read before the workers exit
                if step // first * first not in rss_by_step:
                    rss_by_step[step // first * first] = [round(s["rss"], 1) for s in sample]
            except (OSError, RuntimeError, psutil.Error):
                continue  # a worker that just exited
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log_path}")
    if not first_sample:
        raise RuntimeError(f"no RSS sample: the run never logged step {first_sample_step}; see {log_path}")
    saves = [{"path": m[1], "mib": float(m[2]), "save_s": float(m[3]), "checksum_s": float(m[4])}
             for m in _SAVE_LINE.finditer(log_path.read_text())]

    def growth(kind: str) -> list[float]:
        return [round((b[kind] - a[kind]) / a[kind] * 100, 2) for a, b in zip(first_sample, last_sample)]

    return {"steps": steps, "command": " ".join(cmd), "wall_s": round(time.monotonic() - start, 1),
            "sampled_after_step": first,
            "peak_rss_mib": {str(first): [round(s["hwm"], 1) for s in first_sample],
                             str(steps): [round(s["hwm"], 1) for s in last_sample]},
            "rss_mib": {str(first): [round(s["rss"], 1) for s in first_sample],
                        str(steps): [round(s["rss"], 1) for s in last_sample]},
            "rss_growth_pct": growth("hwm"), "current_rss_growth_pct": growth("rss"),
            "rss_mib_by_step": {str(k): v for k, v in sorted(rss_by_step.items())}, "saves": saves,
            "latest_checkpoint": str(files.find_latest(run_dir / "checkpoints"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-mib", type=int, default=1024, help="0 skips the synthetic checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint directory to hash")
    parser.add_argument("--rss-steps", type=int, default=0, help="steps of the main-job run (0 skips it)")
    parser.add_argument("--work-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra overrides for the rss run")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"hashing": []}
    if args.synthetic_mib:
        report["hashing"].append(synthetic(args.synthetic_mib, work_dir))
    if args.checkpoint:
        report["hashing"].append({"kind": "checkpoint", **hashing_times(args.checkpoint)})
    if args.rss_steps:
        report["rss"] = rss_run(args.rss_steps, work_dir, args.overrides)
        latest = report["rss"]["latest_checkpoint"]
        if latest != "None":
            report["hashing"].append({"kind": "main job checkpoint", **hashing_times(Path(latest))})
    print(f"{'checkpoint':<22} {'MiB':>8} {'files':>5} {'save +s':>8} {'load +s':>8} {'1 rank MiB/s':>12}")
    for row in report["hashing"]:
        print(f"{row['kind']:<22} {row['mib']:>8.1f} {row['files']:>5} {row['save_checksum_s']:>8.3f} "
              f"{row['load_verify_s']:>8.3f} {row['one_rank_mib_per_s']:>12.1f}")
    if "rss" in report:
        rss = report["rss"]
        for step, values in rss["peak_rss_mib"].items():
            current = rss["rss_mib"][step]
            print(f"step {step:>5}: " + ", ".join(f"rank {r} peak {v:.1f} MiB (now {c:.1f})"
                                                  for r, (v, c) in enumerate(zip(values, current))))
        print("current RSS by step (MiB, per rank): " +
              ", ".join(f"{step}: {'/'.join(f'{v:.0f}' for v in values)}"
                        for step, values in rss["rss_mib_by_step"].items()))
        print(f"peak growth: {rss['rss_growth_pct']} %, current growth: {rss['current_rss_growth_pct']} %")
        print(f"growth: {rss['rss_growth_pct']} %; saves: " +
              ", ".join(f"{s['save_s']:.2f}s ({s['checksum_s']:.2f}s checksums)" for s in rss["saves"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
