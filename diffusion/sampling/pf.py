"""PF: the probability-flow ODE (Song et al., ICLR 2021) solved by an adaptive Runge-Kutta method, as the score_sde
code does (scipy's RK45 at rtol = atol = 1e-5), with its final denoising step.

The ODE is written in x and lambda = log(alpha / sigma): dx/dlambda = sigma^2 x - sigma eps(x, t(lambda)), smooth
whatever the discrete schedule, the model called at the float timestep of each lambda the solver asks for
(sampling.core.between). It runs from the first timestep (trailing: T-1) to t = 0, and then takes the model's x0
there (score_sde's `denoise=True`). The solver chooses its own steps: `steps=` and the spacing only set the start,
and the NFE is whatever the tolerances need (sample.py prints it). The step size control is scipy's: the whole batch
is one ODE as in score_sde, so its steps follow the batch's hardest image, and an image differs from its run in
another batch by about the tolerance.

At a tight tolerance this is the exact-ODE reference of the closed-form benchmarks (benchmarks/mixture_testbed.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..schedule import Schedule
from .core import Generator, Model, between, denoise, half_log_snr, refuse_pure_noise_start, steps, t_batch

__all__ = ["pf", "METHODS"]

METHODS = ("RK45", "RK23", "DOP853")  # scipy's explicit adaptive Runge-Kutta pairs (no Jacobian to build)


@torch.no_grad()
def pf(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> Tensor:
    """The probability-flow ODE from timesteps[0] to t = 0 by scipy's `method` at (rtol, atol), then x0 at t = 0.
    Deterministic; NFE = the solver's evaluations + 1."""
    from scipy.integrate import solve_ivp  # scipy's import is slow, and only this sampler needs it

    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"{name}={tol!r} must be a number in (0, 1), the solver's tolerance (1e-5 in score_sde)")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)} (scipy's explicit Runge-Kutta pairs)")
    trajectory, abar = steps(schedule, timesteps)
    refuse_pure_noise_start(trajectory, "PF integrates in lambda = log(alpha / sigma), which is -inf")
    shape, dtype, device = x.shape, x.dtype, x.device

    def velocity(lam: float, flat: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(flat).to(device, dtype).view(shape)
        t, abar_t = between(schedule, lam, xt)
        eps, _ = denoise(model, xt, t, abar_t)
        sigma = math.sqrt(1 - abar_t)
        return (sigma**2 * xt - sigma * eps).double().cpu().numpy().ravel()

    start = x.detach().double().cpu().numpy().ravel()
    span = (half_log_snr(trajectory[0][2]), half_log_snr(abar[0]))
    solution = solve_ivp(velocity, span, start, method=method, rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"the {method} solver stopped before t = 0: {solution.message}")
    x = torch.from_numpy(solution.y[:, -1]).to(device, dtype).view(shape)
    return denoise(model, x, t_batch(x, 0), abar[0])[1]
