"""Shared pytest setup: CPU patches for megatron-core, and the GPU marker skip."""

import os

import pytest
import torch

# Spawned ranks inherit this; one BLAS thread per process keeps 2-4 ranks on 2 cores sane.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
