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
    """w = sigmoid(fc2(silu(fc1(h)))); fc2's bias starts at 0 so w starts near 0.5."""

    def __init__(self, *, hidden_size: int, importance_hidden_size: int,
                 init_method: Optional[Callable[[torch.Tensor], None]] = None,
                 params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, importance_hidden_size, bias=True, dtype=params_dtype)
        self.fc2 = nn.Linear(importance_hidden_size, 1, bias=True, dtype=params_dtype)
        with torch.no_grad():
            if init_method is not None:
                init_method(self.fc1.weight)
                init_method(self.fc2.weight)
            self.fc1.bias.zero_()
            self.fc2.bias.zero_()

    def forward(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        hidden_TD = F.silu(self.fc1(hidden_TH))
        logit_T = self.fc2(hidden_TD).squeeze(-1)
        # float32 at least (bf16 w would make K jumpy); float64 models keep float64.
        return torch.sigmoid(logit_T if logit_T.dtype == torch.float64 else logit_T.float())
