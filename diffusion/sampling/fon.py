"""FON (Liu et al. 2022, the PNDM paper's fourth-order numerical baseline): classical Runge-Kutta on the diffusion
ODE itself, four model calls per step.

The ODE is the probability flow of Song et al. (2021) in DDIM's variables (Song et al. 2021, eq. 14): y = x / alpha
against rho = sigma / alpha, where dy/drho = eps(alpha y, t(rho)) whatever the discrete schedule. Between two
timesteps RK4 calls the model at both ends and twice at the midpoint in rho, a float timestep (sampling.core.between).
In rho one RK4 step is exact when eps is constant, as one DDIM step is; in lambda = -log rho it is not, and on the
cosine schedule it did not converge at fourth order. After the last timestep the step to clean data is DDIM's: x0
from the model's eps. NFE = 4 (S - 1) + 1 for S timesteps.

Where we depart from the official code (luping-liu/PNDM, runner/method.py `gen_fon`): it measures each slope as a
one-timestep DDIM difference (a pseudo slope, as PNDM's own methods) and, after three Runge-Kutta steps, steps by
4th-order Adams-Bashforth on them (one call per step). Ours is the paper's description, classical RK4 on the ODE
with its true slope at every step: what the PNDM paper calls a classical method, and what converges at fourth order
against the exact ODE (tests/test_ode_solvers.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..schedule import Schedule
from .core import Generator, Model, between, denoise, refuse_pure_noise_start, steps, t_batch

__all__ = ["fon"]


@torch.no_grad()
def fon(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, generator: Generator = None) -> Tensor:
    """Classical RK4 on the probability-flow ODE dy = eps d rho (y = x / alpha, rho = sigma / alpha) between
    consecutive timesteps, then DDIM's step to clean data. Deterministic; NFE = 4 (S - 1) + 1."""
    trajectory, _ = steps(schedule, timesteps)
    refuse_pure_noise_start(trajectory, "FON steps the ODE in rho = sigma / alpha, which is infinite")
    for t, s, abar_t, abar_s in trajectory[:-1]:
        rho_t, rho_s = _rho(abar_t), _rho(abar_s)
        h = rho_s - rho_t
        t_mid, abar_mid = between(schedule, -math.log((rho_t + rho_s) / 2), x)
        y = x / abar_t**0.5
        k1 = _slope(model, y, t_batch(x, t), abar_t)
        k2 = _slope(model, y + h / 2 * k1, t_mid, abar_mid)
        k3 = _slope(model, y + h / 2 * k2, t_mid, abar_mid)
        k4 = _slope(model, y + h * k3, t_batch(x, s), abar_s)
        x = abar_s**0.5 * (y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
    t, _, abar_t, _ = trajectory[-1]  # to clean data
    return denoise(model, x, t_batch(x, t), abar_t)[1]


def _rho(abar: float) -> float:
    return ((1 - abar) / abar) ** 0.5


def _slope(model: Model, y: Tensor, t: Tensor, abar: float) -> Tensor:
    """dy/drho = eps(alpha y, t)."""
    return denoise(model, abar**0.5 * y, t, abar)[0]
