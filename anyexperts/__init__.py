"""AnyExperts: expert-parallel pretraining of MoE GPT models with on-demand expert allocation.

Public API:
    AnyExpertsConfig            settings of one AnyExperts MoE layer
    TopPConfig, ReMoEConfig     the same layer with a rival router (top-p, ReMoE)
    get_anyexperts_layer_spec   a megatron-core ModuleSpec for a GPT layer whose MLP is it
"""

from anyexperts.moe.config import AnyExpertsConfig, ReMoEConfig, TopPConfig

__all__ = ["AnyExpertsConfig", "ReMoEConfig", "TopPConfig", "get_anyexperts_layer_spec"]


def __getattr__(name):
    # Imported lazily: the spec pulls in megatron-core, which the config alone does not need.
    if name == "get_anyexperts_layer_spec":
        from anyexperts.moe.specs import get_anyexperts_layer_spec

        return get_anyexperts_layer_spec
    raise AttributeError(name)
