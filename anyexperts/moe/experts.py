"""This rank's local experts as stacked weights, run over one expert-sorted token buffer.

    experts = GroupedExperts(num_local_experts, config)          # megatron TransformerConfig
    out_NH, _ = experts(tokens_NH, tokens_per_expert, probs_N)   # rows sorted by local expert

Same constructor and forward contract as megatron's SequentialMLP, so it can stand in a
MoESubmodules spec (`MoESubmodules(experts=ModuleSpec(module=GroupedExperts))`): the gate
probability of each row is applied inside (folded into the activation), so the caller's
combine is an unweighted sum. `load_from_sequential_mlp(seq_mlp)` copies a SequentialMLP's
weights for equality tests and benchmarks.

Weights (no tensor parallelism): fc1_weight [E_local, H, F1] with F1 = 2F for a gated linear
unit (gate half first, as megatron's linear_fc1 rows), else F; fc2_weight [E_local, F, H];
optional biases fc1_bias [E_local, F1], fc2_bias [E_local, H]. Each is marked
`allreduce = not expert_parallel` exactly as megatron marks expert linear layers, so megatron
DDP reduces them over the expert-data-parallel group. `sharded_state_dict` maps them to
global [num_experts, ...] tensors for megatron's dist_checkpointing (any EP size on load).

Compute paths (`expert_path`, config `moe.expert_path`; expert_paths.py): "grouped_mm"
(torch._grouped_mm where the dtype and strides meet its constraints: CPU fp32/bf16/fp16 with
16-byte row strides, CUDA bf16 on sm90/sm100), "loop" (`_LoopGroupedMM`, a per-expert loop
writing into slices of one output, no torch.cat in either direction; every dtype), "blocked"
(per expert and row block, fc1 -> SwiGLU -> fc2 while the block is in cache; CPU, fp32/fp64
SwiGLU without biases), "auto" (the default: a rule of the shape, blocked from 64 rows per
expert on CPU, the same on every run; on CUDA grouped_mm where it runs, else loop) and
"measure" (CPU: the fastest, timed on the first use of each shape). The CUDA paths are
written for but untested on a GPU.

Tests: tests/test_experts.py, tests/test_expert_paths.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn import Parameter

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from anyexperts.moe import expert_paths
from anyexperts.moe.dispatcher import host_to_device

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _LoopGroupedMM(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ w[e], one mm per expert into slices of one buffer."""

    @staticmethod
    def forward(ctx, x_NI, w_EIO, counts: Sequence[int]):
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
        start = 0
        for expert, count in enumerate(counts):
            if count:
                torch.mm(x_NI[start:start + count], w_EIO[expert], out=out_NO[start:start + count])
            start += count
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EIO = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = x_NI.new_empty(x_NI.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_EIO) if ctx.needs_input_grad[1] else None
        start = 0
        for expert, count in enumerate(ctx.counts):
            if count:
                rows = slice(start, start + count)
                if grad_x is not None:
                    torch.mm(grad_NO[rows], w_EIO[expert].t(), out=grad_x[rows])
                if grad_w is not None:
                    torch.mm(x_NI[rows].t(), grad_NO[rows], out=grad_w[expert])
            start += count
        return grad_x, grad_w, None


class _WeightedSwiGLU(torch.autograd.Function):
    """silu(a) * b * p per row, with x = [a | b]; saves only x and p (recomputes the rest).

    Written with in-place ops and the input gradient assembled in one [N, 2F] buffer (no cat):
    on CPU these elementwise passes are memory-bound, and each temporary [N, F] costs both time
    and peak memory.
    """

    @staticmethod
    def forward(ctx, x_NF2, probs_N):
        ctx.save_for_backward(x_NF2, probs_N)
        a, b = x_NF2.chunk(2, dim=-1)
        return F.silu(a).mul_(b).mul_(probs_N.unsqueeze(-1).to(x_NF2.dtype))

    # Rows per backward chunk: the temporaries of a chunk stay cache-sized, and peak memory
    # gains two [chunk, F] buffers instead of two [N, F] ones.
    chunk_bytes = 1 << 18

    @staticmethod
    def backward(ctx, grad_NF):
        x_NF2, probs_N = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = torch.empty_like(x_NF2)
        grad_probs = torch.empty_like(probs_N) if ctx.needs_input_grad[1] else None
        ffn = grad_NF.shape[1]
        rows = max(16, _WeightedSwiGLU.chunk_bytes // max(1, ffn * grad_NF.element_size()))
        for start in range(0, x_NF2.shape[0], rows):
            chunk = slice(start, start + rows)
            _swiglu_backward_rows(x_NF2[chunk], probs_N[chunk], grad_NF[chunk], grad_x[chunk],
                                  None if grad_probs is None else grad_probs[chunk])
        return grad_x, grad_probs


def _swiglu_backward_rows(x_NF2, probs_N, grad_NF, grad_x_NF2, grad_probs_N) -> None:
    """Writes d/dx and (if given) d/dp of silu(a) * b * p for a block of rows, in place."""
    a, b = x_NF2.chunk(2, dim=-1)
    grad_a, grad_b = grad_x_NF2.chunk(2, dim=-1)
    probs_N1 = probs_N.unsqueeze(-1).to(grad_NF.dtype)
    sig = torch.sigmoid(a)
    silu = a * sig
    if grad_probs_N is not None:
        torch.mul(silu, b, out=grad_b)  # grad_b's slot as scratch for the unweighted activation
        grad_probs_N.copy_(torch.linalg.vecdot(grad_NF, grad_b))
    torch.mul(grad_NF, silu, out=grad_b).mul_(probs_N1)
    # d silu(a) / da = sig + silu * (1 - sig), built in silu's buffer: two temporaries in all.
    dsilu = silu.addcmul_(silu, sig, value=-1).add_(sig)
    torch.mul(grad_NF, b, out=grad_a).mul_(dsilu).mul_(probs_N1)


def grouped_mm_supported(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these without falling back: dtype, and 16-byte row strides
    of both operands (the backward's transposed operands then qualify too). On CUDA only the
    bf16 kernel of sm90/sm100 is used: torch's CUDA fallback loop copies offs to the host (a
    device sync), which the per-expert loop here avoids with host-side counts."""
    if x_NI.dtype not in _GROUPED_MM_DTYPES or w_EIO.dtype != x_NI.dtype:
        return False
    if x_NI.is_cuda and (x_NI.dtype != torch.bfloat16
                         or torch.cuda.get_device_capability(x_NI.device)[0] not in (9, 10)):
        return False
    size = x_NI.element_size()
    return (x_NI.shape[1] * size) % 16 == 0 and (w_EIO.shape[2] * size) % 16 == 0


class GroupedExperts(MegatronModule):
    """Local experts with stacked weights; drop-in for megatron's SequentialMLP."""

    # Rows expert_path="measure" times a shape on: enough blocks per expert to show cache
    # effects, few enough that timing every path costs about a second.
    TIMING_ROWS = 8192

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules=None,
                 pg_collection=None, *, expert_path: str = "auto"):
        super().__init__(config=config)
        if (getattr(config, "expert_tensor_parallel_size", None) or config.tensor_model_parallel_size) > 1:
            raise ValueError("GroupedExperts has no tensor parallelism: set expert_tensor_parallel_size=1")
        if getattr(config, "moe_latent_size", None) is not None:
            raise ValueError("GroupedExperts does not support moe_latent_size")
        self.num_local_experts = num_local_experts
        self.hidden_size = config.hidden_size
        self.ffn_hidden_size = config.moe_ffn_hidden_size or config.ffn_hidden_size
        self.gated = config.gated_linear_unit
        self.activation_func = config.activation_func
        if expert_path not in expert_paths.EXPERT_PATHS:
            raise ValueError(f"expert_path={expert_path!r} must be one of {', '.join(expert_paths.EXPERT_PATHS)}")
        self.expert_path = expert_path
        # The path of the last forward (statistics, tests).
        self.last_path: Optional[str] = None
        fc1_out = self.ffn_hidden_size * (2 if self.gated else 1)
        device = (torch.device("cpu") if config.use_cpu_initialization or not torch.cuda.is_available()
                  else torch.device("cuda", torch.cuda.current_device()))
        dtype = config.params_dtype
        self.fc1_weight = Parameter(torch.empty(num_local_experts, self.hidden_size, fc1_out,
                                                device=device, dtype=dtype))
        self.fc2_weight = Parameter(torch.empty(num_local_experts, self.ffn_hidden_size, self.hidden_size,
                                                device=device, dtype=dtype))
        if config.add_bias_linear:
            self.fc1_bias = Parameter(torch.zeros(num_local_experts, fc1_out, device=device, dtype=dtype))
            self.fc2_bias = Parameter(torch.zeros(num_local_experts, self.hidden_size, device=device, dtype=dtype))
        else:
            self.fc1_bias = self.fc2_bias = None
        if config.perform_initialization:
            self._initialize(config)
        # Groups for checkpoint sharding; None = megatron's global parallel_state groups.
        self.ep_group = getattr(pg_collection, "ep", None)
        self.expt_dp_group = getattr(pg_collection, "expt_dp", None)
        ep_size = self.ep_group.size() if self.ep_group is not None else config.expert_model_parallel_size
        for param in self.parameters():
            # Megatron's rule for expert linear layers (tensor_parallel/layers.py): with EP > 1
            # the grads are reduced over the expert-data-parallel group, not all data-parallel ranks.
            param.allreduce = not ep_size > 1

    @torch.no_grad()
    def _initialize(self, config: TransformerConfig) -> None:
        # Initialise each expert in megatron's [out, in] orientation, then store transposed, so
        # fan-in/fan-out based init methods see the same shapes as in SequentialMLP.
        for expert in range(self.num_local_experts):
            fc1 = torch.empty(self.fc1_weight.shape[2], self.hidden_size, dtype=self.fc1_weight.dtype,
                              device=self.fc1_weight.device)
            config.init_method(fc1)
            self.fc1_weight[expert].copy_(fc1.t())
            fc2 = torch.empty(self.hidden_size, self.ffn_hidden_size, dtype=self.fc2_weight.dtype,
                              device=self.fc2_weight.device)
            config.output_layer_init_method(fc2)
            self.fc2_weight[expert].copy_(fc2.t())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Each stacked weight as a slice of the global [num_experts, ...] tensor (dim 0 split over
        EP ranks), replicated over the expert-data-parallel group, so a checkpoint saved at one
        EP size loads at another. (Not interchangeable with SequentialMLP's per-expert keys.)"""
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        ep_group = self.ep_group or parallel_state.get_expert_model_parallel_group()
        expt_dp_group = self.expt_dp_group or parallel_state.get_expert_data_parallel_group()
        expert_axis = len(sharded_offsets)  # after the axes the parent modules prepend (e.g. layers)
        sharded = {}
        for name, param in self._parameters.items():
            if param is None:
                continue
            sharded[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", param, *sharded_offsets, (expert_axis, ep_group.rank(), ep_group.size()),
                replica_id=(0, 0, expt_dp_group.rank()), prepend_axis_num=len(sharded_offsets))
        return sharded

    @torch.no_grad()
    def load_from_sequential_mlp(self, seq_mlp) -> "GroupedExperts":
        """Copies the weights (and biases) of megatron's SequentialMLP with TP=1; returns self."""
        if len(seq_mlp.local_experts) != self.num_local_experts:
            raise ValueError(f"SequentialMLP has {len(seq_mlp.local_experts)} experts, "
                             f"expected {self.num_local_experts}")
        for expert, mlp in enumerate(seq_mlp.local_experts):
            self.fc1_weight[expert].copy_(mlp.linear_fc1.weight.t())
            self.fc2_weight[expert].copy_(mlp.linear_fc2.weight.t())
            if self.fc1_bias is not None:
                self.fc1_bias[expert].copy_(mlp.linear_fc1.bias)
                self.fc2_bias[expert].copy_(mlp.linear_fc2.bias)
        return self

    # ----------------------------------------------------------------------------------------
    def _matmul(self, x_NI: torch.Tensor, w_EIO: torch.Tensor, counts: list[int], offs, path: str) -> torch.Tensor:
        if path == "grouped_mm" and grouped_mm_supported(x_NI, w_EIO):
            return torch._grouped_mm(x_NI, w_EIO, offs=offs)
        return _LoopGroupedMM.apply(x_NI, w_EIO, counts)

    def _weighted_swiglu(self) -> bool:
        config = self.config
        return (self.gated and self.activation_func is F.silu and getattr(config, "activation_func_clamp_value", None)
                is None and not getattr(config, "glu_linear_offset", 0.0))

    def candidate_paths(self, tokens_NH: torch.Tensor, weights: Optional[list[torch.Tensor]] = None) -> list[str]:
        """The paths that can run these rows with these weights (the first is the default)."""
        weights = self.expert_weights() if weights is None else weights
        grouped_ok = grouped_mm_supported(tokens_NH, weights[0])
        if tokens_NH.is_cuda:  # blocked is a CPU cache path
            return ["grouped_mm", "loop"] if grouped_ok else ["loop"]
        return expert_paths.available_paths(tokens_NH, weights[0], swiglu=self._weighted_swiglu(),
                                            has_bias=len(weights) > 2, grouped_ok=grouped_ok)

    def _choose_path(self, tokens_NH: torch.Tensor, probs_N: torch.Tensor, weights: list[torch.Tensor],
                     counts: list[int]) -> str:
        fc1_weight, fc2_weight = weights[0], weights[1]
        candidates = self.candidate_paths(tokens_NH, weights)
        if tokens_NH.is_cuda:  # no timing on a GPU: grouped_mm where its kernel runs, else the loop
            return candidates[0] if self.expert_path in ("auto", "measure") else expert_paths.choose_path(
                self.expert_path, (), candidates, None)
        grad = torch.is_grad_enabled() and (tokens_NH.requires_grad or any(w.requires_grad for w in weights))
        key = expert_paths.shape_key(tokens_NH, fc1_weight, fc2_weight, self.gated, grad)
        return expert_paths.choose_path(self.expert_path, key, candidates,
                                        lambda path: self._time_path(path, tokens_NH, probs_N, weights, counts, grad))

    def _time_path(self, path: str, tokens_NH, probs_N, weights, counts: list[int], grad: bool) -> float:
        """Seconds of one forward (+ backward) of `path` on random rows with these counts, scaled
        down to at most TIMING_ROWS rows; the layer's weights are copied, its grads untouched, and
        the global random state is not used."""
        scale = min(1.0, self.TIMING_ROWS / max(1, tokens_NH.shape[0]))
        counts = [int(round(count * scale)) for count in counts]
        gen = torch.Generator(device=tokens_NH.device).manual_seed(0)
        x_NH = torch.randn(sum(counts), tokens_NH.shape[1], generator=gen, device=tokens_NH.device,
                           dtype=tokens_NH.dtype)
        p_N = torch.rand(sum(counts), generator=gen, device=tokens_NH.device, dtype=probs_N.dtype)
        grad_NH = torch.randn(x_NH.shape, generator=gen, device=x_NH.device, dtype=x_NH.dtype)
        copies = [w.detach().clone().requires_grad_(grad) for w in weights]
        x_NH.requires_grad_(grad)
        p_N.requires_grad_(grad)

        def run():
            with torch.set_grad_enabled(grad):
                out_NH = self._compute(path, x_NH, counts, p_N, copies)
                if grad:
                    out_NH.backward(grad_NH)
            for leaf in (x_NH, p_N, *copies):
                leaf.grad = None

        return expert_paths.time_candidate(run)

    def _activation(self, fc1_NF: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
        if self._weighted_swiglu():
            return _WeightedSwiGLU.apply(fc1_NF, probs_N)
        clamp = getattr(self.config, "activation_func_clamp_value", None)
        offset = getattr(self.config, "glu_linear_offset", 0.0)
        if self.gated:
            gate, linear = fc1_NF.chunk(2, dim=-1)
            if clamp is not None:
                gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
            act = self.activation_func(gate) * (linear + offset)
        else:
            act = self.activation_func(fc1_NF)
        return (act * probs_N.unsqueeze(-1)).to(fc1_NF.dtype)

    def expert_weights(self) -> list[torch.Tensor]:
        """The stacked [E_local, ...] parameters, in the order forward_with_borrowed takes them."""
        return [w for w in (self.fc1_weight, self.fc2_weight, self.fc1_bias, self.fc2_bias) if w is not None]

    def forward(self, tokens_NH: torch.Tensor, tokens_per_expert, probs_N: torch.Tensor):
        """tokens_NH sorted by local expert, tokens_per_expert its counts (tensor or list), probs_N
        each row's gate. Returns (out_NH, None) with out = p * FFN_e(x) per row."""
        return self._forward_with(tokens_NH, tokens_per_expert, probs_N, self.expert_weights())

    def forward_with_borrowed(self, tokens_NH: torch.Tensor, tokens_per_expert, probs_N: torch.Tensor,
                              borrowed: list[torch.Tensor]):
        """forward() over this rank's experts followed by B borrowed ones: `borrowed` holds one
        [B, ...] tensor per expert_weights() entry, tokens_per_expert E_local + B counts.

        The borrowed weights are always concatenated, also when B = 0: the graph, and with it
        the order of the backward's collectives, is then the same on every rank."""
        weights = [torch.cat([own, extra]) for own, extra in zip(self.expert_weights(), borrowed)]
        return self._forward_with(tokens_NH, tokens_per_expert, probs_N, weights)

    def _forward_with(self, tokens_NH: torch.Tensor, tokens_per_expert, probs_N: torch.Tensor,
                      weights: list[torch.Tensor]):
        num_experts = weights[0].shape[0]
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        if len(counts) != num_experts or sum(counts) != tokens_NH.shape[0]:
            raise ValueError(f"tokens_per_expert {counts} does not match {num_experts} experts "
                             f"and {tokens_NH.shape[0]} rows")
        tokens_NH = tokens_NH.contiguous()
        path = self.last_path = self._choose_path(tokens_NH, probs_N, weights, counts)
        return self._compute(path, tokens_NH, counts, probs_N, weights), None

    def _compute(self, path: str, tokens_NH: torch.Tensor, counts: list[int], probs_N: torch.Tensor,
                 weights: list[torch.Tensor]) -> torch.Tensor:
        fc1_weight, fc2_weight = weights[0], weights[1]
        fc1_bias, fc2_bias = (weights[2], weights[3]) if len(weights) > 2 else (None, None)
        if path == "blocked":
            return expert_paths.blocked_swiglu_experts(tokens_NH, probs_N, fc1_weight, fc2_weight, counts)
        device = tokens_NH.device
        counts_host = torch.tensor(counts, dtype=torch.int64)
        offs = host_to_device(counts_host.cumsum(0).to(torch.int32), device) if path == "grouped_mm" else None
        fc1_NF = self._matmul(tokens_NH, fc1_weight, counts, offs, path)
        if fc1_bias is not None:
            expert_N = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                               host_to_device(counts_host, device), output_size=len(tokens_NH))
            fc1_NF = fc1_NF + fc1_bias.index_select(0, expert_N)
        act_NF = self._activation(fc1_NF, probs_N)
        out_NH = self._matmul(act_NF, fc2_weight, counts, offs, path)
        if fc2_bias is not None:
            # As megatron's expert MLP: the output bias is scaled by the gate too.
            out_NH = out_NH + fc2_bias.index_select(0, expert_N) * probs_N.unsqueeze(-1).to(out_NH.dtype)
        return out_NH
