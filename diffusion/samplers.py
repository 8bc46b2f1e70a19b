"""Samplers: the paper algorithms as plain functions with one signature.

    sampler(model, x, schedule, timesteps, *, generator=None, **options) -> x0

`model(x, t) -> eps` with t int64 [B]; `x` is the starting noise x_T [B, C, H, W]; `timesteps` is a descending
int64 tensor (see diffusion.timesteps). Each step goes from t to s, the next timestep (s = -1 after the last:
clean data).

Notation (code -> Song et al. 2021, DDIM): abar_t = alpha_t in their paper, x0 = f_theta(x_t) (eq. 9),
sigma = sigma_t(eta) (eq. 16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedule import Schedule

Model = Callable[[Tensor, Tensor], Tensor]

__all__ = ["ddim", "Model"]


def _pairs(timesteps: Tensor) -> list[tuple[int, int]]:
    """(t, s) for each step: the visited timestep and the one after it (-1 after the last)."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError("timesteps must be strictly descending")
    return list(zip(ts, ts[1:] + [-1], strict=True))


def _abar(schedule: Schedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _ddim_step(
    x: Tensor,
    eps: Tensor,
    abar_t: float,
    abar_s: float,
    *,
    eta: float = 0.0,
    clip: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_s (Song et al. eq. 12), shared by DDIM, DDPM and PNDM's transfer."""
    # 1. the clean estimate x0 (eq. 9), optionally clipped to the data range with eps made consistent
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
    # 2. the noise level: sigma(eta) of eq. 16; eta = 1 is DDPM's posterior std between t and s
    sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) ** 0.5
    # 3. the direction pointing to x_t, plus fresh noise
    x = abar_s**0.5 * x0 + (1 - abar_s - sigma**2) ** 0.5 * eps
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def ddim(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    clip: bool = True,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like at eta = 1."""
    for t, s in _pairs(timesteps):
        eps = model(x, torch.full((len(x),), t, dtype=torch.int64, device=x.device))
        x = _ddim_step(x, eps, _abar(schedule, t), _abar(schedule, s), eta=eta, clip=clip, generator=generator)
    return x
