"""Micro-batches for one data-parallel rank, addressed by the number of samples consumed.

Global batch g holds samples [g * global_batch, (g + 1) * global_batch) of the (already
shuffled) megatron GPTDataset; micro-batch m of it on data-parallel rank r holds
`micro_batch` consecutive samples starting at m * micro_batch * dp_size + r * micro_batch.
Because the position is a single integer (consumed samples), resuming is exact, and
the samples a global batch covers do not depend on the data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    data_parallel_rank: int

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def sample_indices(self, consumed_samples: int, micro_batch_index: int) -> range:
        start = (consumed_samples + micro_batch_index * self.micro_batch_size * self.data_parallel_size
                 + self.data_parallel_rank * self.micro_batch_size)
        return range(start, start + self.micro_batch_size)


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], np.ndarray):
            values = [torch.from_numpy(v) for v in values]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
    return batch


def micro_batches(dataset, layout: BatchLayout, consumed_samples: int,
                  device: Optional[torch.device] = None) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of the global batch that starts at `consumed_samples`."""
    for micro in range(layout.num_micro_batches):
        indices = layout.sample_indices(consumed_samples, micro)
        # Wrap around rather than fail when a run asks for more samples than were built.
        batch = collate([dataset[i % len(dataset)] for i in indices])
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield batch
