"""Timestep sequences for few-step sampling: descending int64 tensors of S steps drawn from 0 .. T-1.

Fewer steps is a shorter sequence, not a new process: every sampler walks the given timesteps and lands on
clean data (t = -1) after the last one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["leading", "linspace", "trailing", "quadratic", "SPACINGS"]


def leading(steps: int, T: int) -> Tensor:
    """The DDIM paper's uniform skip: 0, k, 2k, ... with k = T // steps (Song et al. 2021, appendix D.2)."""
    _check(steps, T)
    return _descending(torch.arange(steps) * (T // steps))


def linspace(steps: int, T: int) -> Tensor:
    """Evenly spaced from 0 to T-1 inclusive, rounded (PNDM's and many libraries' default)."""
    _check(steps, T)
    return _descending(torch.linspace(0, T - 1, steps, dtype=torch.float64).round())


def trailing(steps: int, T: int) -> Tensor:
    """Evenly spaced ending at T-1: T-1, T-1-k, ... (starts from the noisiest step; Lin et al. 2024)."""
    _check(steps, T)
    return _descending(torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1)


def quadratic(steps: int, T: int) -> Tensor:
    """The DDIM paper's quadratic spacing (i * sqrt(0.8 T) / (steps - 1))^2, denser at low noise (CIFAR-10).

    At 50+ steps the DDIM code repeats the smallest timesteps (each repeat a wasted model evaluation); here a
    repeat is moved up to the next free integer so that every step moves.
    """
    _check(steps, T)
    ts = (torch.linspace(0, math.sqrt(T * 0.8), steps, dtype=torch.float64) ** 2).floor().tolist()
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    if ts[-1] > T - 1:
        raise ValueError(f"quadratic spacing cannot fit {steps} distinct steps in T={T}; use fewer steps")
    return _descending(torch.tensor(ts))


SPACINGS = {"leading": leading, "linspace": linspace, "trailing": trailing, "quadratic": quadratic}


def _descending(ts: Tensor) -> Tensor:
    return ts.to(torch.int64).sort(descending=True).values


def _check(steps: int, T: int) -> None:
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
