"""What a sampling run needs around a sampler: per-image noise and counting model evaluations."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["image_noise", "CountCalls"]


def image_noise(seed: int, indices: Iterable[int], shape: tuple[int, ...]) -> Tensor:
    """x_T [len(indices), *shape] where image i's noise depends only on (seed, i), as in EDM's generate.py,
    so the images do not change with the batch size or the number of GPUs."""
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, i)).generate_state(1)[0]))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows)


class CountCalls(nn.Module):
    """Wraps a model and counts its evaluations (the NFE of a sampler)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x, t)
