"""Side-by-side summary of training runs from their metrics.jsonl (JSON + printed table).

    python tools/compare_runs.py runs/shakespeare_cpu/A runs/shakespeare_cpu/B [--json out.json]

Per run: steps, first and last training loss, last validation loss, mean real and virtual
experts per token over the MoE layers (last logged step), tokens/s (median over logged
steps) and the per-layer real experts per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _layer_values(record: dict, name: str) -> list[float]:
    prefix = f"moe/{name}/layer"
    items = sorted((int(k[len(prefix):]), v) for k, v in record.items() if k.startswith(prefix))
    return [v for _, v in items if isinstance(v, (int, float))]


def summarise(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass run directories written by launcher.train")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    if not train:
        raise ValueError(f"{path} holds no training steps")
    vals = [r for r in records if "val_loss" in r]
    last = train[-1]
    real = _layer_values(last, "real_experts_per_token")
    virtual = _layer_values(last, "virtual_experts_per_token")
    return {
        "run": str(run_dir),
        "steps": last["step"],
        "first_loss": train[0]["loss"],
        "last_loss": last["loss"],
        "last_val_loss": vals[-1]["val_loss"] if vals else None,
        "real_experts_per_token": sum(real) / len(real) if real else None,
        "virtual_experts_per_token": sum(virtual) / len(virtual) if virtual else None,
        "real_per_layer": real,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train if "tokens_per_s" in r),
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        rows = [summarise(run) for run in args.runs]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'run':<40} {'steps':>5} {'loss0':>7} {'loss':>7} {'val':>7} {'real/tok':>8} {'virt/tok':>8} "
          f"{'tok/s':>7}  real per layer")
    for row in rows:
        print(f"{Path(row['run']).name:<40} {row['steps']:>5} {row['first_loss']:>7.4f} {row['last_loss']:>7.4f} "
              f"{_fmt(row['last_val_loss'], '7.4f'):>7} {_fmt(row['real_experts_per_token'], '8.3f'):>8} "
              f"{_fmt(row['virtual_experts_per_token'], '8.3f'):>8} {row['tokens_per_s']:>7.0f}  "
              f"{[round(v, 2) for v in row['real_per_layer']]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
