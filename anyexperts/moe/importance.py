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
    """w = sigmoid(z + offset); z = fc2(silu(fc1(h))), or with logit_std set,
    z = logit_std * (l - mean) / std with the running mean and std of the logit l;
    fc2's bias starts at 0 so w starts near 0.5.

    `logit_offset` is the budget's integral controller (budget_bias_rate > 0): not a
    parameter; after each optimizer step losses.update_selection_biases() moves it by
    -rate * (R - budget_target), R the step's mean real slots per token counted here
    (`count_for_budget`, summed over the data-parallel ranks there).

    `logit_mean` / `logit_scale` (logit_std set) are the previous step's mean and std of l
    over every training token of every data-parallel rank, updated there too. A learned
    allocation drives the logits apart without limit (measured: half of the first layer's
    tokens below -8, a quarter above +8), and then no offset moves them: the budget stops
    holding. Standardised, the logits keep their order and shape, the offset reaches every
    token, and the MLP cannot drift the level the controller sets. Buffers, not batch
    statistics: a token's w does not depend on the other tokens of its batch, so expert
    parallelism and micro-batching leave it unchanged. All saved with the model.
    """

    def __init__(self, *, hidden_size: int, importance_hidden_size: int,
                 init_method: Optional[Callable[[torch.Tensor], None]] = None,
                 params_dtype: torch.dtype = torch.float32, budget_bias_rate: float = 0.0,
                 budget_target: Optional[float] = None, logit_std: Optional[float] = None,
                 scale_coeff: float = 0.0) -> None:
        super().__init__()
        self.logit_std = logit_std
        self.scale_coeff = scale_coeff
        # The last training forward's scale loss (graph attached; the layer adds it to the aux losses).
        self.scale_loss: Optional[torch.Tensor] = None
        self.budget_bias_rate = budget_bias_rate if budget_target is not None else 0.0
        self.budget_target = budget_target
        self.register_buffer("logit_offset", torch.zeros(1, dtype=torch.float32))
        # [sum of counted real slots, tokens] of this rank since the last update.
        self.register_buffer("budget_counts", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.register_buffer("logit_mean", torch.zeros(1, dtype=torch.float32))
        self.register_buffer("logit_scale", torch.ones(1, dtype=torch.float32))
        # [tokens, sum l, sum l^2] of this rank's training forwards since the last update.
        self.register_buffer("logit_moments", torch.zeros(3, dtype=torch.float64), persistent=False)
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
        self.scale_loss = None
        if self.normalizes_logit and self.scale_coeff > 0 and self.training and torch.is_grad_enabled() \
                and logit_T.numel() > 1:
            # The running statistics carry no gradient, so without this the raw logit's scale drifts
            # freely (measured: std 6 in one layer, 0.09 in another after 200 steps), and the MLP's
            # effective step size with it; this holds the raw logit near mean 0, std 1.
            mean, std = logit_T.mean(), logit_T.std(correction=0).clamp(min=1e-6)
            self.scale_loss = self.scale_coeff * (mean.square() + std.log().square())
        if self.normalizes_logit:
            if self.training and torch.is_grad_enabled():
                with torch.no_grad():
                    raw_T = logit_T.detach().double()
                    self.logit_moments += torch.stack([torch.full_like(raw_T.sum(), raw_T.numel()), raw_T.sum(),
                                                       raw_T.square().sum()])
            scale = self.logit_std / self.logit_scale.to(logit_T.dtype)
            logit_T = (logit_T - self.logit_mean.to(logit_T.dtype)) * scale
        return torch.sigmoid(logit_T + self.logit_offset.to(logit_T.dtype))

    @property
    def normalizes_logit(self) -> bool:
        return self.logit_std is not None

    @torch.no_grad()
    def update_logit_statistics(self, moments_3: torch.Tensor) -> None:
        """Mean and std of the raw logit from [tokens, sum, sum of squares] (all ranks summed)."""
        num_tokens, total, total_sq = moments_3.unbind()
        mean = total / num_tokens.clamp(min=1)
        std = (total_sq / num_tokens.clamp(min=1) - mean.square()).clamp(min=0).sqrt()
        seen = num_tokens > 0  # a step without training forwards keeps the statistics
        self.logit_mean.copy_(torch.where(seen, mean, self.logit_mean.double()).float())
        # The floor keeps a (near-)constant logit from being blown up into noise.
        self.logit_scale.copy_(torch.where(seen, std.clamp(min=1e-3), self.logit_scale.double()).float())
        self.logit_moments.zero_()

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
        self.logit_mean.data = self.logit_mean.data.float()
        self.logit_scale.data = self.logit_scale.data.float()
        self.logit_moments.data = self.logit_moments.data.double()
        return self
