"""Stop-on-signal for preemption: the handler only records the signal; ranks agree at a step boundary.

    stop = StopSignal.install()                  # SIGTERM, SIGUSR1, SIGINT
    for ...:                                     # the training loop
        train_one_step()
        signum = stop.agreed(device=device)      # one tiny all_reduce(MAX) over the world, every step
        if signum:
            save_checkpoint(); break
    stop.restore()

Why this shape:
- A Python signal handler runs between bytecodes of the main thread, possibly in the
  middle of a collective or a checkpoint write. So it does nothing but set a flag.
- Ranks get signals at different moments (or only some get one: torchrun forwards SIGTERM
  to its own workers only, Slurm may signal one node first). If each rank acted on its own
  flag, one rank would enter the checkpoint save while another starts the next step's
  all-reduce, and both would wait until the collective timeout. `agreed()` takes the MAX
  of every rank's flag over the whole world at the same point of every step, so all ranks
  see the same answer and stop after the same step. The cost is one all_reduce of one
  integer per step.
- torchrun forwards only SIGINT, SIGTERM, SIGHUP and SIGQUIT to its workers (then kills
  them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s). SIGUSR1 reaches a rank only
  when it is signalled directly (srun with one task per rank, `scancel --signal=USR1`).
  slurm/_env.sh turns Slurm's time-limit USR1 into SIGTERM for the steps.
- A second signal is not escalated to a hard exit: Ctrl-C in a terminal sends SIGINT to
  every process of the group and torchrun forwards another one, so each worker normally
  sees two within milliseconds. To stop without a checkpoint, use SIGKILL (or let
  torchrun's shutdown timeout do it).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

# SIGTERM: Slurm preemption / scancel / torchrun forwarding; SIGUSR1: Slurm's --signal
# warning when delivered to the rank itself; SIGINT: Ctrl-C.
DEFAULT_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignal:
    """Records the first stop signal a rank receives; `agreed()` makes it a world-wide decision."""

    def __init__(self) -> None:
        self.received: int = 0  # signal number, 0 = none
        self.received_at: Optional[float] = None
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls, signals: tuple = DEFAULT_STOP_SIGNALS) -> "StopSignal":
        """Installs the flag-setting handler (main thread only; Python's rule for signal handlers)."""
        stop = cls()
        for signum in signals:
            stop._previous[signum] = signal.signal(signum, stop._handle)
        return stop

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        # Only record: anything more could run in the middle of a collective or a file write.
        if not self.received:
            self.received = int(signum)
            self.received_at = time.monotonic()

    def restore(self) -> None:
        """Puts back the handlers that were there before install()."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def agreed(self, device: Optional[torch.device] = None, group=None) -> int:
        """The stop signal any rank of `group` (default: the world) has received, else 0.

        A collective: every rank must call it at the same point of every step.
        """
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def debug_hooks(step: int, *, signal_at_step: int, fail_at_step: int) -> None:
    """Test hooks (trainer.debug_signal_at_step / debug_fail_at_step): after `step`, the last
    rank sends itself a real SIGTERM, or raises, so that tests can check that one rank's
    signal stops every rank and one rank's crash ends the whole job."""
    if not dist.is_initialized() or dist.get_rank() != dist.get_world_size() - 1:
        return
    if signal_at_step and step == signal_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
    if fail_at_step and step == fail_at_step:
        raise RuntimeError(f"trainer.debug_fail_at_step={step}: failure injected on rank {dist.get_rank()}")
