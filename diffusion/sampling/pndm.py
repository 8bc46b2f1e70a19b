"""PNDM (Liu et al. 2022): pseudo numerical methods on the diffusion ODE, with DDIM's eta = 0 update as the transfer.

    pndm     F-PNDM: three pseudo Runge-Kutta steps, then the 4th-order pseudo linear multistep (S + 9 calls)
    s_pndm   S-PNDM: one pseudo improved Euler step, then the 2nd-order multistep (S + 1)
    plms     PLMS as in Stable Diffusion: the multistep of growing order, no Runge-Kutta start (S + 1)

`history` holds the eps of the last steps, newest last.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import Schedule
from .core import Generator, Model, ddim_step, refuse_pure_noise_start, steps, t_batch

__all__ = ["pndm", "s_pndm", "plms"]

# Adams-Bashforth weights of order 1..4, newest eps first (PNDM's pseudo linear multistep uses order 4).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


# -------------------------------------------------------------------- PNDM (Liu et al. 2022)
def _pndm(
    model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, warmup: str, order: int, clip: bool
) -> Tensor:
    """Pseudo linear multistep of up to `order`, after `warmup` steps of pseudo Runge-Kutta ("rk", three steps)
    or pseudo improved Euler ("heun", one step). Every update is the transfer phi = DDIM's eta = 0 step.

    The transfer reads alpha_bar at the visited timestep t itself, the same index the model was called with
    (the official code reads alphas_cump[t + 1], the next timestep's). The model is never called at clean data,
    so the final step is always a multistep one (of the order its history allows), even within the warm-up.
    """
    trajectory, abar = steps(schedule, timesteps)
    refuse_pure_noise_start(trajectory, "PNDM's transfer divides by sqrt(alpha_bar), which is 0")
    n_warmup = 3 if warmup == "rk" else 1
    history: list[Tensor] = []
    for i, (t, s, abar_t, abar_s) in enumerate(trajectory):
        eps = model(x, t_batch(x, t))
        history = [*history[-3:], eps]
        warming_up = i < n_warmup and s >= 0
        if warming_up and warmup == "rk":
            # pseudo Runge-Kutta: the midpoint t - delta/2 rounded down to an integer m (s <= m < t), whose own
            # alpha_bar the transfers use, so each stage lands exactly on the noise level the model is told
            m = (t + s) // 2
            x1 = ddim_step(x, eps, abar_t, abar[m], clip=clip)
            e2 = model(x1, t_batch(x, m))
            x2 = ddim_step(x, e2, abar_t, abar[m], clip=clip)
            e3 = model(x2, t_batch(x, m))
            x3 = ddim_step(x, e3, abar_t, abar_s, clip=clip)
            e4 = model(x3, t_batch(x, s))
            eps = (eps + 2 * e2 + 2 * e3 + e4) / 6
        elif warming_up:
            # pseudo improved Euler: average the slopes at t and at the Euler (DDIM) prediction of x_s
            e2 = model(ddim_step(x, eps, abar_t, abar_s, clip=clip), t_batch(x, s))
            eps = (eps + e2) / 2
        else:
            # pseudo linear multistep: Adams-Bashforth on the eps history, newest first
            weights = _ADAMS_BASHFORTH[min(order, len(history))]
            eps = eps * weights[0]
            for w, e in zip(weights[1:], reversed(history[:-1]), strict=False):
                eps.add_(e, alpha=w)
        x = ddim_step(x, eps, abar_t, abar_s, clip=clip)
    return x


@torch.no_grad()
def pndm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """F-PNDM (Liu et al. 2022): three pseudo Runge-Kutta steps (4 model calls each), then the 4th-order pseudo
    linear multistep. NFE = S + 9 for S >= 4 steps (4S - 3 for S <= 3: the final step is never Runge-Kutta).

    Runge-Kutta midpoints t - delta/2 are rounded down to integers, and alpha_bar is read at the visited timestep
    itself (not one index later, as the official code does). The pseudo methods combine eps from several points,
    and the transfer from t multiplies an error in that combination by about sqrt(abar_s / abar_t): from a
    timestep whose alpha_bar is tiny (the cosine schedule's t = T-1: 2e-9) they go wrong (`clip` only bounds the
    damage). Start below it, as the paper does (`leading` spacing), or use `dpm_solver`, which combines x0 instead.
    """
    return _pndm(model, x, schedule, timesteps, warmup="rk", order=4, clip=clip)


@torch.no_grad()
def s_pndm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """S-PNDM (Liu et al. 2022): one pseudo improved Euler step (2 calls), then the 2nd-order pseudo linear
    multistep. NFE = S + 1 (1 for S = 1). The notes of `pndm` apply."""
    return _pndm(model, x, schedule, timesteps, warmup="heun", order=2, clip=clip)


@torch.no_grad()
def plms(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """PLMS as in Stable Diffusion: one pseudo improved Euler step, then pseudo linear multistep of order 2, 3,
    then 4 as the history grows (Liu et al. 2022 without the Runge-Kutta start). NFE = S + 1 (1 for S = 1).
    The notes of `pndm` apply."""
    return _pndm(model, x, schedule, timesteps, warmup="heun", order=4, clip=clip)
