"""The AnyExperts MoE layer, step by step along the data path (see README, "Map of the code")."""
