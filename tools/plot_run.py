"""Draws the PNG pictures of one or more runs (or of a routing trace alone).

    python tools/plot_run.py runs/shakespeare_cpu/A [runs/shakespeare_cpu/B ...] --out pictures/
    python tools/plot_run.py runs/shakespeare_cpu/A/routing_traces/step_0000150_rank0.npz --out pictures/

A run directory gives loss_curves.png (all the runs given, compared), tokens_per_expert.png,
and from its last routing trace k_histogram.png, text_allocation.png (K and importance over
the characters of a validation sequence) and real_experts_by_class.png; with several runs
the per-run files are prefixed by the run's directory name. A .npz or .pt path draws only
the three trace pictures. anyexperts/training/pictures.py says what each picture shows; the
main job (trainer.pictures_at_end=true) writes the same set to <run_dir>/pictures/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anyexperts.training.pictures import draw_run_pictures, draw_trace_pictures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, or one routing trace file")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        print(f"error: {', '.join(missing)} not found", file=sys.stderr)
        return 2
    traces = [path for path in args.paths if path.is_file()]
    try:
        if traces:
            if len(args.paths) > 1:
                print("error: give either run directories or one trace file", file=sys.stderr)
                return 2
            written, skipped = draw_trace_pictures(traces[0], args.out)
        else:
            written, skipped = draw_run_pictures(args.paths, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: drawing needs matplotlib (pip install matplotlib): {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    for line in skipped:
        print(f"skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
