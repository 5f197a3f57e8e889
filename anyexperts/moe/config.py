"""Settings of one AnyExperts MoE layer (docs: ../../README.md, "The AnyExperts layer").

Plain dataclass with no Hydra or megatron dependency, so that users can build the layer
in their own megatron-core models: `AnyExpertsConfig(k_min=2, k_max=6, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


K_ROUNDINGS = ("straight_through", "fractional", "nearest", "dither")


@dataclass
class AnyExpertsConfig:
    # Per-token total slots K_i in [k_min, k_max], from the importance w_i (see k_rounding).
    k_min: int = 1
    k_max: int = 4
    # How w_i becomes K_i (allocation.py), kappa_i = k_min + w_i (k_max - k_min):
    # fractional (learned): ceil(kappa) slots in training, the last weighted by frac, so the LM loss
    #   reaches w; round(kappa) whole slots at evaluation (training computes up to one more slot).
    # straight_through (learned): floor(kappa + d_s) slots in training and evaluation, the extra
    #   slot's gradient from frac(kappa). nearest: round(kappa). dither: floor(kappa + d_s),
    #   d_s = frac((s + 0.5) * 0.618...) from the sequence position s. nearest and dither give w no
    #   gradient from the LM loss (K is an integer function of w): kept for ablation.
    k_rounding: str = "straight_through"  # straight_through | fractional | nearest | dither
    num_virtual_experts: int = 2
    # At most floor(rho_max * K_i) of a token's slots are virtual.
    rho_max: float = 0.25
    virtual_kind: str = "zero"  # zero | copy | constant
    # Straight-through gradient for the virtual decision (router.virtual_straight_through_mass):
    # where a virtual slot was allowed but not taken, the loss tells the virtual logits whether the
    # real expert in that slot was worth it. Without it zero experts get no loss gradient at all.
    learn_virtual: bool = False
    # all: gates normalised over every selected entry (virtual ones dilute the real output);
    # real: over real entries only.
    gate_norm: str = "all"
    importance_hidden_size: int = 64
    # Standardise the importance logit to this std with its running statistics (importance.py):
    # a learned allocation otherwise pushes most logits past where the integral controller's
    # offset can move them, and the budget stops holding (docs/METHOD.md). None = raw logit.
    importance_logit_std: Optional[float] = None
    # Residual fusion out = y + alpha * w * h; alpha is a learned scalar when learn_alpha.
    alpha: float = 0.0
    learn_alpha: bool = False
    # Loss coefficients (0 switches a loss off).
    load_balance_coeff: float = 1e-2
    load_balance_scope: str = "micro_batch"  # micro_batch | global_batch
    budget_coeff: float = 1e-1
    # Target mean real experts per token; None means no budget term.
    budget_target: Optional[float] = None
    # micro_batch: the budget term over this rank's micro-batch; global_batch: over the
    # data-parallel ranks and the micro-batches of the step so far (losses.py).
    budget_scope: str = "micro_batch"  # micro_batch | global_batch
    # The budget term also moves the router's mass on virtual entries (losses.py): over budget,
    # more virtual slots as well as fewer slots, so the router learns when a virtual one is enough.
    budget_on_virtual: bool = True
    # Integral budget controller: after each optimizer step the importance logit offset moves by
    # -rate * (measured real slots per token - budget_target), against the steady-state error the
    # budget loss leaves when the language-model gradient pulls w the other way; at 0.05 it only
    # halved that error on Shakespeare (docs/RESULTS.md). 0 = off.
    budget_bias_rate: float = 0.0
    z_loss_coeff: float = 1e-3
    # DeepSeek-V3 aux-loss-free balancing: per-expert selection bias, updated by this rate.
    bias_update_rate: float = 0.0
    # Capacity per expert in real-slot units: factor x (real slots / experts); None = unlimited.
    capacity_factor: Optional[float] = None

    def validate(self, *, num_experts: int, prefix: str = "") -> None:
        """Raises ValueError naming the field (with `prefix`, e.g. 'moe.anyexperts.')."""

        def fail(name: str, message: str) -> None:
            raise ValueError(f"{prefix}{name}={getattr(self, name)!r} {message}")

        if self.k_min < 1:
            fail("k_min", "must be >= 1: every token needs at least one slot")
        if self.k_min > self.k_max:
            fail("k_min", f"must not exceed {prefix}k_max={self.k_max}")
        if self.k_max > num_experts + self.num_virtual_experts:
            fail("k_max", f"exceeds the {num_experts} real + {self.num_virtual_experts} virtual experts")
        if not 0.0 <= self.rho_max < 1.0:
            fail("rho_max", "must lie in [0, 1)")
        if self.num_virtual_experts < 0:
            fail("num_virtual_experts", "must be >= 0")
        if self.rho_max > 0 and self.num_virtual_experts < 1:
            fail("num_virtual_experts", f"must be >= 1 when {prefix}rho_max={self.rho_max} > 0")
        # The cap leaves at least k_max - floor(rho_max*k_max) real slots; more than E cannot exist.
        min_real_at_kmax = self.k_max - int(self.rho_max * self.k_max)
        if min_real_at_kmax > num_experts:
            fail("k_max", f"needs at least {min_real_at_kmax} real experts per token but there are {num_experts}")
        if self.k_rounding not in K_ROUNDINGS:
            fail("k_rounding", f"must be one of {', '.join(K_ROUNDINGS)}")
        if self.virtual_kind not in ("zero", "copy", "constant"):
            fail("virtual_kind", "must be one of zero, copy, constant")
        if self.gate_norm not in ("all", "real"):
            fail("gate_norm", "must be 'all' or 'real'")
        if self.load_balance_scope not in ("micro_batch", "global_batch"):
            fail("load_balance_scope", "must be 'micro_batch' or 'global_batch'")
        if self.budget_scope not in ("micro_batch", "global_batch"):
            fail("budget_scope", "must be 'micro_batch' or 'global_batch'")
        if self.importance_logit_std is not None and self.importance_logit_std <= 0:
            fail("importance_logit_std", "must be > 0 (or null for the raw logit)")
        if self.importance_hidden_size < 1:
            fail("importance_hidden_size", "must be >= 1")
        for name in ("load_balance_coeff", "budget_coeff", "z_loss_coeff", "bias_update_rate", "budget_bias_rate"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.budget_bias_rate > 0 and self.budget_target is None:
            fail("budget_bias_rate", "needs a budget_target (the count it steers to)")
        if self.budget_target is not None and not self.k_min <= self.budget_target <= self.k_max:
            fail("budget_target", f"must lie in [k_min={self.k_min}, k_max={self.k_max}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", "must be > 0 (or null for no capacity limit)")
