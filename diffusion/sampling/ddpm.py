"""DDPM: ancestral sampling (Ho et al. 2020, Algorithm 2), respaced for fewer steps (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import Schedule
from .core import Generator, Model, ddim_step, denoise, steps, t_batch

__all__ = ["ddpm"]


@torch.no_grad()
def ddpm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    variance: str = "posterior",
    clip: bool = True,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2); on a shorter `timesteps`, the respaced process of
    Nichol & Dhariwal 2021 (sec. 4: betas 1 - abar_t / abar_s between the visited steps). NFE = S.

    Args:
        variance: "posterior" (beta-tilde, Ho et al. eq. 7; the same as DDIM with eta = 1) or "beta" (sigma^2 =
            beta). The last step adds no noise, as in Algorithm 2.
        clip: on by default, as in Ho et al.'s code (p_sample's clip_denoised); the other samplers' papers do not.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' (beta-tilde) or 'beta', got {variance!r}")
    trajectory, _ = steps(schedule, timesteps)
    for t, s, abar_t, abar_s in trajectory:
        std = (1 - abar_t / abar_s) ** 0.5 if variance == "beta" and s >= 0 else None
        eps, x0 = denoise(model, x, t_batch(x, t), abar_t)
        x = ddim_step(x, eps, abar_t, abar_s, eta=1.0, std=std, clip=clip, generator=generator, x0=x0)
    return x
