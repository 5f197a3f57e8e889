"""Routing traces: what every AnyExperts layer decided for every token, for tools to draw.

    from anyexperts.moe.trace import routing_trace, save_trace
    with routing_trace() as trace:
        model(tokens, position_ids, attention_mask)
    save_trace(trace, "routing.pt")        # or "routing.npz"

Under routing_trace() every AnyExperts layer appends one dict per forward to the list,
with CPU tensors (T = tokens of that forward, in the layer's [seq * batch] order, K = k_max):
    layer_number   int
    importance     float32 [T]      w
    k              int64   [T]      total slots K_i
    expert_ids     int64   [T, K]   selected entries in rank order: real expert ids 0..E-1,
                                    virtual ids E..E+V-1, -1 on unused slots
    virtual_mask   bool    [T, K]   True on virtual slots
    dropped_mask   bool    [T, K]   True on real slots dropped by the capacity limit
    gates          float32 [T, K]
    num_experts    int              E (to tell real from virtual ids)
    modality       int64   [T]      the token's modality index, when a TokenInfo was set
                                    around the forward (token_info.py)
Traces copy to the host, so they are for analysis runs, not for every training step.
Nested routing_trace() blocks each get every record.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch

_ACTIVE: list[list[dict]] = []


@contextlib.contextmanager
def routing_trace() -> Iterator[list[dict]]:
    records: list[dict] = []
    _ACTIVE.append(records)
    try:
        yield records
    finally:
        _ACTIVE.remove(records)


def is_active() -> bool:
    return bool(_ACTIVE)


def append(record: dict) -> None:
    """Called by the layers: adds one forward's record to every open trace."""
    cpu_record = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in record.items()}
    for records in _ACTIVE:
        records.append(cpu_record)


def save_trace(trace: list[dict], path: Union[str, Path]) -> Path:
    """Writes a trace with torch.save (any suffix but .npz) or as a NumPy .npz archive
    whose keys are `<index>/<field>` (index = position in the trace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays = {}
        for index, record in enumerate(trace):
            for key, value in record.items():
                arrays[f"{index}/{key}"] = value.numpy() if torch.is_tensor(value) else np.asarray(value)
        np.savez_compressed(path, **arrays)
    else:
        torch.save(list(trace), path)
    return path


def load_trace(path: Union[str, Path]) -> list[dict]:
    """Reads what save_trace wrote (either format) back into a list of dicts of tensors."""
    path = Path(path)
    if path.suffix != ".npz":
        return torch.load(path, weights_only=True)
    records: dict[int, dict] = {}
    with np.load(path) as archive:
        for name in archive.files:
            index, key = name.split("/", 1)
            value = archive[name]
            records.setdefault(int(index), {})[key] = value.item() if value.ndim == 0 else torch.from_numpy(value)
    return [records[i] for i in sorted(records)]
