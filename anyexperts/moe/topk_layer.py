"""The project's top-k path: megatron-core's MoELayer (`moe=topk moe.grouped_gemm=true`).

    spec = ModuleSpec(module=TopKMoELayer, submodules=MoESubmodules(experts=grouped_experts_spec()))

megatron's MoELayer with its router, aux losses and alltoall dispatcher, and the project's
GroupedExperts (anyexperts.model.layer_specs builds the spec). One change to the dispatcher:
megatron's MoEAlltoAllTokenDispatcher always reorders the received rows from (source rank,
expert) to (expert, source rank) order when a rank holds several experts, and back before the
combine, as a split of every row and a cat (four [N, H] copies per forward + backward). With one
expert-parallel and one tensor-parallel rank that order is the identity, so
_AlltoAllWithoutIdentitySort skips it; everything else is megatron's, and the results are equal
bit for bit (tests/test_topk_layer.py). moe=topk without grouped_gemm stays megatron's own
layer, the baseline the benchmarks compare against.
"""

from __future__ import annotations

import contextlib

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


class _AlltoAllWithoutIdentitySort(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher without its sort-by-local-expert where that is the identity."""

    def _sort_is_identity(self) -> bool:
        return self.ep_size * self.tp_size == 1 and not self.drop_and_pad

    @contextlib.contextmanager
    def _as_one_local_expert(self):
        # The two methods below reorder only when num_local_experts > 1 (megatron 0.16); the
        # counts per expert, which the experts read, are kept in tokens_per_expert unchanged.
        num_local_experts = self.num_local_experts
        self.num_local_experts = 1
        try:
            yield
        finally:
            self.num_local_experts = num_local_experts

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not self._sort_is_identity():
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        with self._as_one_local_expert():
            return super().dispatch_postprocess(global_input_tokens, global_probs)

    def combine_preprocess(self, hidden_states):
        if not self._sort_is_identity():
            return super().combine_preprocess(hidden_states)
        with self._as_one_local_expert():
            return super().combine_preprocess(hidden_states)


class TopKMoELayer(MoELayer):
    """megatron's MoELayer whose alltoall dispatcher skips the identity sort (module docstring)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            self.token_dispatcher = _AlltoAllWithoutIdentitySort(
                self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection)
