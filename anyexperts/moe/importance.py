"""Step 1 of the AnyExperts layer: the per-token importance w in (0, 1).

    predictor = ImportancePredictor(hidden_size=256, importance_hidden_size=64)
    importance_T = predictor(hidden_TH)          # float32 (float64 for float64 params), [T]

w_i = sigmoid(MLP(h_i)) with MLP: d -> d_imp -> 1 (SiLU in between). w drives the number
of slots a token gets (router.py; that integer allocation carries no gradient) and the
residual fusion out = y + alpha * w * h (layer.py), and the budget loss (losses.py)
holds its mean on target. The sigmoid runs in float32 at least whatever the parameter dtype, so
that K = k_min + round(w * (k_max - k_min)) does not depend on bf16 rounding of w.

The parameters are ordinary replicated (data-parallel) parameters: they are not expert
parameters and keep megatron's default `allreduce=True`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class ImportancePredictor(nn.Module):
    """w = sigmoid(c tanh(fc2(silu(fc1(h))) / c) + offset), c = logit_cap (no cap when None);
    fc2's bias starts at 0 so w starts near 0.5.

    `logit_offset` is the budget's integral controller (budget_bias_rate > 0): not a
    parameter; after each optimizer step losses.update_selection_biases() moves it by
    -rate * (R - budget_target), R the step's mean real slots per token counted here
    (`count_for_budget`, summed over the data-parallel ranks there). It is saved with the
    model, so a resumed run continues with it.
    """

    def __init__(self, *, hidden_size: int, importance_hidden_size: int,
                 init_method: Optional[Callable[[torch.Tensor], None]] = None,
                 params_dtype: torch.dtype = torch.float32, budget_bias_rate: float = 0.0,
                 budget_target: Optional[float] = None, logit_cap: Optional[float] = None) -> None:
        super().__init__()
        self.logit_cap = logit_cap
        self.budget_bias_rate = budget_bias_rate if budget_target is not None else 0.0
        self.budget_target = budget_target
        self.register_buffer("logit_offset", torch.zeros(1, dtype=torch.float32))
        # [sum of counted real slots, tokens] of this rank since the last update.
        self.register_buffer("budget_counts", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.fc1 = nn.Linear(hidden_size, importance_hidden_size, bias=True, dtype=params_dtype)
        self.fc2 = nn.Linear(importance_hidden_size, 1, bias=True, dtype=params_dtype)
        with torch.no_grad():
            if init_method is not None:
                init_method(self.fc1.weight)
                init_method(self.fc2.weight)
            self.fc1.bias.zero_()
            self.fc2.bias.zero_()

    @property
    def controls_budget(self) -> bool:
        return self.budget_bias_rate > 0

    def forward(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        hidden_TD = F.silu(self.fc1(hidden_TH))
        logit_T = self.fc2(hidden_TD).squeeze(-1)
        # float32 at least (bf16 w would make K jumpy); float64 models keep float64.
        logit_T = logit_T if logit_T.dtype == torch.float64 else logit_T.float()
        if self.logit_cap:
            # Soft cap: the learned allocation drives logits apart without limit (w ~ 0 or 1 for
            # most tokens), and then no bounded offset can move them: the budget stops holding.
            logit_T = self.logit_cap * torch.tanh(logit_T / self.logit_cap)
        return torch.sigmoid(logit_T + self.logit_offset.to(logit_T.dtype))

    @torch.no_grad()
    def count_for_budget(self, num_real_counted_T: torch.Tensor) -> None:
        self.budget_counts += torch.stack([num_real_counted_T.double().sum(),
                                           torch.full((), float(num_real_counted_T.numel()), dtype=torch.float64,
                                                      device=num_real_counted_T.device)])

    def _apply(self, fn, *args, **kwargs):
        # megatron's Float16Module calls .bfloat16(): the controller state stays float32 / float64.
        super()._apply(fn, *args, **kwargs)
        self.logit_offset.data = self.logit_offset.data.float()
        self.budget_counts.data = self.budget_counts.data.double()
        return self
