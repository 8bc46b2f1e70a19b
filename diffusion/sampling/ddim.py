"""DDIM (Song et al. 2021): the implicit sampler, deterministic at eta = 0, DDPM-like at eta = 1."""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import Schedule
from .core import Generator, Model, ddim_step, denoise, steps, t_batch

__all__ = ["ddim"]


@torch.no_grad()
def ddim(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    eta: float = 0.0,
    clip: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM (posterior variance) at eta = 1. NFE = S."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    trajectory, _ = steps(schedule, timesteps)
    for t, _, abar_t, abar_s in trajectory:
        eps, x0 = denoise(model, x, t_batch(x, t), abar_t)
        x = ddim_step(x, eps, abar_t, abar_s, eta=eta, clip=clip, generator=generator, x0=x0)
    return x
