"""A budget controller: one scalar setting of a router moved after each optimizer step so that
the mean real experts per token tracks a target.

    controller = RealExpertsController(initial=0.4, target=2.0, rule="additive", rate=0.01,
                                       min_value=1e-3, max_value=1.0, raises_count=True)
    controller.count(num_real_T)                 # training forwards: this rank's tokens
    update_count_controllers(model, group)       # after each optimizer step (losses.py calls it)
    controller.value                             # float64 [1], saved with the model

Rules (R = the step's mean real experts per token over `group`, t = target):
- additive: value += rate * (t - R), or -= when raising the value lowers the count
  (a threshold such as top-p's p, the DTop-p idea: an integral controller);
- multiplicative: value *= rate ** sign(R - t), or ** sign(t - R) when raising the value
  raises the count (ReMoE's adaptive L1 coefficient, rate = its alpha).
The value is clipped to [min_value, max_value]. A step without training forwards leaves it
alone. Every rank all-reduces the same counts, so every rank holds the same value.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

RULES = ("additive", "multiplicative")


class RealExpertsController(nn.Module):
    def __init__(self, *, initial: float, target: Optional[float], rule: str, rate: float,
                 min_value: float, max_value: float, raises_count: bool) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule={rule!r} must be one of {', '.join(RULES)}")
        if not min_value <= initial <= max_value:
            raise ValueError(f"initial={initial!r} must lie in [{min_value}, {max_value}]")
        self.target = target
        self.rule = rule
        self.rate = rate
        self.min_value, self.max_value = min_value, max_value
        self.raises_count = raises_count
        # Shape [1], not a 0-dim tensor: it travels through megatron's sharded checkpoints.
        self.register_buffer("value", torch.full((1,), float(initial), dtype=torch.float64))
        # [sum of real experts over tokens, tokens] since the last update.
        self.register_buffer("counts", torch.zeros(2, dtype=torch.float64), persistent=False)

    @property
    def is_active(self) -> bool:
        neutral_rate = 1.0 if self.rule == "multiplicative" else 0.0
        return self.target is not None and self.rate != neutral_rate

    @torch.no_grad()
    def count(self, num_real_T: torch.Tensor) -> None:
        if self.is_active:
            self.counts += torch.stack([num_real_T.double().sum(),
                                        torch.full((), float(num_real_T.numel()), dtype=torch.float64,
                                                   device=num_real_T.device)]).to(self.counts.device)

    @torch.no_grad()
    def step(self, counts: torch.Tensor) -> None:
        """Moves the value from summed counts [real experts, tokens]; zeroes this rank's counts."""
        counted, num_tokens = counts[0], counts[1]
        error = torch.where(num_tokens > 0, self.target - counted / num_tokens.clamp(min=1), torch.zeros_like(counted))
        direction = 1.0 if self.raises_count else -1.0
        if self.rule == "additive":
            new_value = self.value + direction * self.rate * error
        else:
            new_value = self.value * torch.pow(torch.full_like(self.value, self.rate), direction * torch.sign(error))
        self.value.copy_(new_value.clamp(self.min_value, self.max_value))
        self.counts.zero_()

    def _apply(self, fn, *args, **kwargs):
        # megatron's Float16Module calls .bfloat16(): a bf16 threshold or coefficient would
        # swallow small steps, a bf16 count is exact only to 256.
        super()._apply(fn, *args, **kwargs)
        self.value.data = self.value.data.double()
        self.counts.data = self.counts.data.double()
        return self

    def extra_repr(self) -> str:
        return f"rule={self.rule}, target={self.target}, rate={self.rate}"


@torch.no_grad()
def update_count_controllers(modules: Iterable[nn.Module], group=None) -> None:
    """Steps every active controller among `modules` with one all-reduce of their counts over
    `group` (None: this process alone)."""
    controllers = [m for m in modules if isinstance(m, RealExpertsController) and m.is_active]
    if not controllers:
        return
    counts_L2 = torch.stack([c.counts for c in controllers])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_L2, group=group)
    for controller, counts in zip(controllers, counts_L2):
        controller.step(counts)
