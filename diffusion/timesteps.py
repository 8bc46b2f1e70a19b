"""Timestep sequences for few-step sampling: descending int64 tensors of S steps drawn from 0 .. T-1.

Fewer steps is a shorter sequence, not a new process: every sampler walks the given timesteps and lands on
clean data (t = -1) after the last one. `SPACINGS` need only T; `logsnr` needs the schedule itself, and
`make(name, steps, schedule)` builds any of them by name (what sample.py calls).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .schedule import Schedule

__all__ = ["leading", "linspace", "trailing", "quadratic", "logsnr", "SPACINGS", "NAMES", "make"]


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


def logsnr(steps: int, schedule: Schedule) -> Tensor:
    """Uniform in lambda_t = log(sqrt(abar_t / (1 - abar_t))) from the noisiest usable timestep to t = 0
    (DPM-Solver, Lu et al. 2022).

    Each lambda is mapped to the nearest integer timestep (linear interpolation of lambda over t, rounded); where
    several round to the same t (the low-noise end at many steps), they are spread to the nearest free integers.
    The grid starts at the noisiest t whose beta_t is below 1/2: T-1 for the linear schedule, 996 of the cosine
    schedule at T = 1000, whose final betas (clipped at 0.999) send lambda off a cliff (-6.5 to -9.9 in one
    step). The paper stops the cosine schedule short for the same reason (t_T = 0.9946); starting at T-1 would
    spend the first steps of a 10-step grid at 999, 998, 997, 994 and triple DPM-Solver's error there.
    """
    T = schedule.T
    _check(steps, T)
    start = int(torch.nonzero(schedule.betas < 0.5).max())  # the noisiest timestep before any cliff
    abar = schedule.alphas_cumprod[: start + 1].cpu()
    lam = (0.5 * (abar.log() - (-abar).log1p())).numpy()  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], steps)
    ts = np.interp(targets, lam[::-1], np.arange(start, -1, -1, dtype=np.float64)).round().astype(np.int64)
    ts = np.sort(ts)  # ascending; move repeats up to the next free integer, then back under T-1 if needed
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = min(ts[-1], T - 1)
    for i in range(steps - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return _descending(torch.from_numpy(ts))


SPACINGS = {"leading": leading, "linspace": linspace, "trailing": trailing, "quadratic": quadratic}
NAMES = (*SPACINGS, "logsnr")


def make(spacing: str, steps: int, schedule: Schedule) -> Tensor:
    """The spacing named `spacing` (one of NAMES) with `steps` steps for `schedule`."""
    if spacing == "logsnr":
        return logsnr(steps, schedule)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}: choose one of {', '.join(NAMES)}")
    return SPACINGS[spacing](steps, schedule.T)


def _descending(ts: Tensor) -> Tensor:
    return ts.to(torch.int64).sort(descending=True).values


def _check(steps: int, T: int) -> None:
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
