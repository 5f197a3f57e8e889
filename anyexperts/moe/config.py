"""Settings of one AnyExperts MoE layer and of its rival routers, top-p and ReMoE (docs:
../../README.md, "The AnyExperts layer" and "Rival routing methods").

Plain dataclass with no Hydra or megatron dependency, so that users can build the layer
in their own megatron-core models: `AnyExpertsConfig(k_min=2, k_max=6, ...)`,
`TopPConfig(target_real_experts=2.0)`, `ReMoEConfig(target_real_experts=2.0)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


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
    # With importance_logit_std: coefficient of (mean l)^2 + (log std l)^2 on the raw logit l of each
    # training forward, which keeps the raw scale (and the MLP's effective step size) from drifting.
    importance_scale_coeff: float = 0.0
    # Residual fusion out = y + alpha * w * h; alpha is a learned scalar when learn_alpha.
    alpha: float = 0.0
    learn_alpha: bool = False
    # Loss coefficients (0 switches a loss off).
    load_balance_coeff: float = 1e-2
    load_balance_scope: str = "micro_batch"  # micro_batch | global_batch
    budget_coeff: float = 1e-1
    # Target mean real experts per token; None means no budget term.
    budget_target: Optional[float] = None
    # Per-modality targets, e.g. {image: 1.4, text: 2.2}: the budget term then holds each
    # modality's mean real experts per token at its own target (tokens of a modality not
    # listed follow budget_target, or no term when it is None). Needs each token's modality
    # (token_info.py) in training forwards. None (or empty) = one budget for every token.
    # Typed Any: OmegaConf merges a command-line dict into neither a None nor a struct Dict
    # node; validate() checks the names and numbers instead.
    budget_target_by_modality: Optional[Any] = None
    # micro_batch: the budget term over this rank's micro-batch; global_batch: over the
    # data-parallel ranks and the micro-batches of the step so far (losses.py).
    budget_scope: str = "micro_batch"  # micro_batch | global_batch
    # The budget term also moves the router's mass on virtual entries (losses.py): over budget,
    # more virtual slots as well as fewer slots, so the router learns when a virtual one is enough.
    budget_on_virtual: bool = True
    # Integral budget controller: after each optimizer step the importance logit offset moves by
    # -rate * (measured real slots per token - budget_target), against the steady-state error the
    # budget loss leaves when the language-model gradient pulls w the other way. It holds every
    # layer only together with importance_logit_std (moe=anyexperts: 0.5 and 2.0; docs/METHOD.md).
    # 0 = off.
    budget_bias_rate: float = 0.0
    # Virtual slots per token the virtual entries' selection bias steers to (router.py): after
    # each optimizer step the bias moves by -virtual_bias_rate * (measured - target). The count is
    # held; which tokens take a virtual slot is left to the router logits, which with gates over
    # every selected entry (gate_norm="all") learn from the loss where a real expert's share can
    # go to a virtual one. None = off; off as well where no slot can be virtual (holds_virtual_slots).
    virtual_target: Optional[float] = None
    virtual_bias_rate: float = 0.0
    z_loss_coeff: float = 1e-3
    # DeepSeek-V3 aux-loss-free balancing: per-expert selection bias, updated by this rate.
    bias_update_rate: float = 0.0
    # Capacity per expert in real-slot units: factor x (real slots / experts); None = unlimited.
    capacity_factor: Optional[float] = None

    @property
    def holds_virtual_slots(self) -> bool:
        """Whether a slot can be virtual at all: V >= 1 and floor(rho_max * k_max) >= 1."""
        return self.num_virtual_experts > 0 and math.floor(self.rho_max * self.k_max) >= 1

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
        for name in ("load_balance_coeff", "budget_coeff", "z_loss_coeff", "bias_update_rate", "budget_bias_rate",
                     "importance_scale_coeff", "virtual_bias_rate"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.virtual_bias_rate > 0 and self.virtual_target is None:
            fail("virtual_bias_rate", "needs a virtual_target (the count it steers to)")
        # Where no slot can be virtual (the reduction to top-k: V = 0 or rho_max = 0), the
        # virtual count is 0 by construction and the controller is off (router.controls_virtual).
        if self.virtual_target is not None and self.holds_virtual_slots:
            max_virtual = math.floor(self.rho_max * self.k_max)
            if not 0.0 <= self.virtual_target <= max_virtual:
                fail("virtual_target", f"must lie in [0, floor(rho_max * k_max) = {max_virtual}] virtual slots per token")
            if self.virtual_bias_rate <= 0:
                fail("virtual_bias_rate", "must be > 0 when virtual_target is set (it is what steers to the target)")
        if self.budget_bias_rate > 0 and self.budget_target is None:
            fail("budget_bias_rate", "needs a budget_target (the count it steers to)")
        if self.budget_target is not None and not self.k_min <= self.budget_target <= self.k_max:
            fail("budget_target", f"must lie in [k_min={self.k_min}, k_max={self.k_max}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", "must be > 0 (or null for no capacity limit)")
        if self.budget_target_by_modality:
            self._validate_budget_by_modality(fail)

    def _validate_budget_by_modality(self, fail) -> None:
        from anyexperts.moe.token_info import MODALITY_NAMES

        name = "budget_target_by_modality"
        targets = self.budget_target_by_modality
        if not hasattr(targets, "items"):
            fail(name, "must map modality names to targets, e.g. {image: 1.4, text: 2.2}")
        for modality, target in dict(targets).items():
            if modality not in MODALITY_NAMES:
                fail(name, f"names modality {modality!r}; modalities are {', '.join(MODALITY_NAMES)}")
            if isinstance(target, bool) or not isinstance(target, (int, float)):
                fail(name, f"gives {modality!r} the target {target!r}, not a number")
            if not self.k_min <= target <= self.k_max:
                fail(name, f"gives {modality!r} the target {target}, outside [k_min={self.k_min}, k_max={self.k_max}]")
        if self.k_max == self.k_min:
            fail(name, f"needs a range of K to budget: k_min = k_max = {self.k_min}")
        if self.budget_coeff <= 0:
            fail(name, "needs budget_coeff > 0 (the per-modality targets act through the budget term)")
        if self.budget_scope != "micro_batch":
            fail(name, "supports budget_scope='micro_batch' only")
        if self.budget_bias_rate > 0:
            fail(name, "cannot be combined with budget_bias_rate > 0: the integral controller holds one "
                       "target for all tokens; set budget_bias_rate=0")


def _check_shared(config, *, num_experts: int, prefix: str) -> int:
    """Checks the fields the rival routing configs share; returns their slot columns K."""

    def fail(name: str, message: str) -> None:
        raise ValueError(f"{prefix}{name}={getattr(config, name)!r} {message}")

    if config.max_experts is not None and not 1 <= config.max_experts <= num_experts:
        fail("max_experts", f"must lie in [1, {num_experts}] (the real experts), or be null for all of them")
    num_slots = num_experts if config.max_experts is None else config.max_experts
    if config.target_real_experts is not None and not 1.0 <= config.target_real_experts <= num_slots:
        fail("target_real_experts", f"must lie in [1, {num_slots}] (max_experts), or be null for no controller")
    for name in ("load_balance_coeff", "z_loss_coeff"):
        if getattr(config, name) < 0:
            fail(name, "must be >= 0")
    if config.capacity_factor is not None and config.capacity_factor <= 0:
        fail("capacity_factor", "must be > 0 (or null for no capacity limit)")
    return num_slots


def _layer_settings(config) -> AnyExpertsConfig:
    # The rival routers decide every token's experts themselves: no importance, no virtual
    # experts, no fusion, no budget loss; only the losses and the capacity are the layer's.
    # The layer's own K range is then unused (its K histogram spans the router's slot_range).
    return AnyExpertsConfig(k_min=1, k_max=1, k_rounding="nearest", num_virtual_experts=0, rho_max=0.0,
                            alpha=0.0, learn_alpha=False, budget_coeff=0.0, budget_target=None,
                            load_balance_coeff=config.load_balance_coeff, z_loss_coeff=config.z_loss_coeff,
                            capacity_factor=config.capacity_factor)


@dataclass
class TopPConfig:
    """Top-p routing ("Harder Tasks Need More Experts", arXiv 2403.07652): per token, experts
    in probability order until their summed probability reaches p; raw probabilities as gates."""

    # Initial threshold p in (0, 1] (the paper's 0.4).
    top_p: float = 0.4
    # Slot columns: at most this many experts per token; null = all E.
    max_experts: Optional[int] = None
    # Router-entropy loss: without it the router flattens its distribution to buy experts.
    entropy_coeff: float = 1e-4
    # Mean real experts per token the threshold controller holds; null = p stays fixed (the paper).
    target_real_experts: Optional[float] = None
    # After each optimizer step p += p_update_rate * (target - measured), clipped to [1e-3, 1].
    p_update_rate: float = 0.01
    load_balance_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None

    def validate(self, *, num_experts: int, prefix: str = "") -> None:
        _check_shared(self, num_experts=num_experts, prefix=prefix)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{prefix}top_p={self.top_p!r} must lie in (0, 1]")
        for name in ("entropy_coeff", "p_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}{name}={getattr(self, name)!r} must be >= 0")

    def layer_settings(self) -> AnyExpertsConfig:
        """The AnyExperts layer's settings around this router: its losses and capacity."""
        return _layer_settings(self)


@dataclass
class ReMoEConfig:
    """ReMoE routing (arXiv 2412.14711): gates ReLU(router logits), an expert is active where
    its gate is > 0; an L1 penalty on the gates with an adaptive coefficient holds the count."""

    max_experts: Optional[int] = None
    # The coefficient's start (the paper's 1e-8) and its factor per step (the paper's 1.2):
    # after each optimizer step l1_coeff *= l1_coeff_factor ** sign(measured - target).
    l1_coeff: float = 1e-8
    l1_coeff_factor: float = 1.2
    # Weigh each expert's gates by its share of the active slots (E n_e / sum n, no gradient):
    # the paper's load-balanced L1, which penalises busy experts more.
    l1_balance: bool = True
    # Mean real experts per token the coefficient holds; null = the coefficient stays fixed.
    target_real_experts: Optional[float] = None
    # A shift b of every gate, ReLU(logit + b), moved after each step by
    # threshold_rate * (target - measured). The L1 can only close gates, and a gate at 0 gets
    # no gradient: when the language-model loss closes a layer's gates early (measured: two of
    # four layers at 0.02-0.2 experts per token by step 100), only a shift reopens them.
    # 0 = the paper's router (no shift).
    threshold_rate: float = 0.0
    load_balance_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None

    def validate(self, *, num_experts: int, prefix: str = "") -> None:
        _check_shared(self, num_experts=num_experts, prefix=prefix)
        if self.threshold_rate < 0:
            raise ValueError(f"{prefix}threshold_rate={self.threshold_rate!r} must be >= 0 (0: no gate shift)")
        if self.threshold_rate > 0 and self.target_real_experts is None:
            raise ValueError(f"{prefix}threshold_rate={self.threshold_rate!r} needs a target_real_experts "
                             "(the count it steers to)")
        if not self.l1_coeff > 0:
            raise ValueError(f"{prefix}l1_coeff={self.l1_coeff!r} must be > 0 (it is scaled by a factor per step)")
        if not self.l1_coeff_factor >= 1.0:
            raise ValueError(f"{prefix}l1_coeff_factor={self.l1_coeff_factor!r} must be >= 1")

    def layer_settings(self) -> AnyExpertsConfig:
        """The AnyExperts layer's settings around this router: its losses and capacity."""
        return _layer_settings(self)
