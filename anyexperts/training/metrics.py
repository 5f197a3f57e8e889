"""Run logging: metrics.jsonl, TensorBoard and rank-0 console progress with ETA.

Only the logging rank (global rank 0) writes. `metrics.jsonl` in the run directory holds
one JSON object per logged step with at least step, loss, lr, grad_norm, tokens_per_s,
plus val_loss on validation steps and the per-layer MoE statistics as
`moe/<name>/layer<i>` keys. Events (a checkpoint rejected at resume, a failed save) are
records with an `event` key, the step, and no loss. TensorBoard gets the same scalars (and histograms for the
1-D per-layer statistics such as tokens_per_expert and k_histogram).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, console: bool = True,
                 max_steps: int = 0, real_experts_budget: Optional[float] = None) -> None:
        self.enabled = enabled
        self.console = console and enabled
        self.max_steps = max_steps
        # Real experts per token the run is meant to compute (top-k: k; AnyExperts: budget_target).
        self.real_experts_budget = real_experts_budget
        self._jsonl = None
        self._writer = None
        self._start_time = time.monotonic()
        self._start_step: Optional[int] = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file.
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), max_queue=1000)

    def log(self, step: int, scalars: dict[str, Any], vectors: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Writes one step: `scalars` to jsonl + TB scalars, `vectors` (1-D) to jsonl + TB histograms."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in scalars.items()}}
        for key, vec in (vectors or {}).items():
            record[key] = _jsonable(vec)
        self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in scalars.items():
                value = _jsonable(value)
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            for key, vec in (vectors or {}).items():
                vec = vec.detach().float().cpu()
                if vec.numel():
                    # A histogram over expert index (or K) weighted by the counts.
                    index = torch.arange(vec.numel(), dtype=torch.float32)
                    self._writer.add_histogram(key, index.repeat_interleave(vec.clamp(min=0).round().long())
                                               if vec.sum() > 0 else index, step)

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        """One event record in metrics.jsonl: {"event": kind, **fields}."""
        if self.enabled:
            self._jsonl.write(json.dumps({"event": kind, **{k: _jsonable(v) for k, v in fields.items()}}) + "\n")

    def progress(self, step: int, scalars: dict[str, Any]) -> None:
        """One console line on the logging rank: step, loss, lr, grad norm, tokens/s, ETA."""
        if not self.console:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step - 1, time.monotonic()
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        eta = elapsed / done * (self.max_steps - step) if done > 1 else float("nan")
        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:.0f} tok/s")):
            if key in scalars and scalars[key] is not None:
                parts.append(fmt.format(_jsonable(scalars[key])))
        real = scalars.get("real_experts_per_token")
        if real is not None:
            text = f"real/tok {real:.2f}"
            at_eval = scalars.get("real_experts_per_token_at_eval")
            if at_eval is not None:  # fractional training computes more than evaluation will
                text += f" (train; {at_eval:.2f} at eval)"
            if scalars.get("val_real_experts_per_token") is not None:
                text += f" val {scalars['val_real_experts_per_token']:.2f}"
            if self.real_experts_budget is not None:
                text += f" budget {self.real_experts_budget:.2f}"
            parts.append(text)
        if math.isfinite(eta):
            parts.append(f"ETA {_format_duration(eta)}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def info(self, message: str) -> None:
        if self.console:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
