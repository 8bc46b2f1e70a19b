"""DPM-Solver++ (Lu et al. 2022): an exponential integrator of the probability-flow ODE in the data prediction x0,
stepping in lambda = log(alpha / sigma), with a multistep history of x0 (2M: Algorithm 2; 3M: the same at third
order). NFE = S for both.

The step onto clean data (lambda = inf) is first order: it returns the last x0, the paper's lower-order final step
taken to its limit. The history is a local list of (lambda, x0), newest last; its coefficients are Python floats
computed once per step from the float64 schedule. Each sampler's default spacing is `logsnr`, the paper's grid.

Notation (code -> paper):
    alpha, sigma     sqrt(abar), sqrt(1 - abar); lam = log(alpha / sigma), half the log-SNR (schedule.half_log_snr)
    h                lam_s - lam_t, the step
    r_0, r_1         h_0 / h, h_1 / h: the last two steps over this one
    m, x0            the data prediction x_theta(x_t, t) (eq. 8)
    phi_1            e^{-h} - 1: h phi_1(h) of the exponential integrator
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..schedule import Schedule, half_log_snr, x_at
from .core import Generator, Model, denoise, steps, t_batch

__all__ = ["dpm_solver", "dpm_solver_3m", "LOWER_ORDER_FINAL"]

History = list[tuple[float, Tensor]]  # (lam, x0) at the visited timesteps, newest last
LOWER_ORDER_FINAL = True  # dpm_solver_3m's default, decided on the exact mixtures: benchmarks/lower_order_final.py


# -------------------------------------------------------------------- DPM-Solver++ (Lu et al. 2022)
def _multistep_x0(history: History, h: float, phi_1: float) -> Tensor:
    """D in x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 D: the x0 that a multistep of order len(history) <= 3
    integrates over the step (1: x0; 2: Algorithm 2's (1 + 1/(2r)) x0 - 1/(2r) x0_prev; 3: the 3M update)."""
    lam_0, m_0 = history[-1]
    if len(history) == 1:
        return m_0
    lam_1, m_1 = history[-2]
    r_0 = (lam_0 - lam_1) / h
    d1_0 = (m_0 - m_1) / r_0
    if len(history) == 2:
        return m_0 + 0.5 * d1_0
    lam_2, m_2 = history[-3]
    r_1 = (lam_1 - lam_2) / h
    d1_1 = (m_1 - m_2) / r_1
    # first and second derivatives of x0 in lambda from three points; their phi_2, phi_3 weights (e^{-h} - 1 + h
    # over h, then h^2) divided by phi_1, so one formula `x_s = ... - alpha_s phi_1 D` serves every order
    d1 = d1_0 + (r_0 / (r_0 + r_1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r_0 + r_1)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return m_0 - (phi_2 / phi_1) * d1 + (phi_3 / phi_1) * d2


def _dpm_solver_multistep(
    model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, order: int, clip: bool, lower_final: bool = False
) -> Tensor:
    """DPM-Solver++(order M): orders 1, 2, .. rising to `order` as the history fills, then first order onto clean
    data (it returns the last x0); `lower_final`: order at most S - i at step i, so the step before that one is of
    order 2 at most (the official code's lower_order_final). NFE = S."""
    trajectory, _ = steps(schedule, timesteps)
    history: History = []
    for i, (t, s, abar_t, abar_s) in enumerate(trajectory):
        _, x0 = denoise(model, x, t_batch(x, t), abar_t, clip)
        if s < 0:
            return x0
        if abar_t == 0:  # pure noise (zero terminal SNR), lambda = -inf: DDIM's step from the model's x0; no history
            x = x_at(x0, x, abar_s)  # sigma_t = 1, so x_t is its own noise
            continue
        lam_t = half_log_snr(abar_t)
        history = [*history[len(history) + 1 - order :], (lam_t, x0)]
        h = half_log_snr(abar_s) - lam_t
        phi_1 = math.expm1(-h)
        used = history[-(len(trajectory) - i) :] if lower_final else history
        x = ((1 - abar_s) / (1 - abar_t)) ** 0.5 * x - abar_s**0.5 * phi_1 * _multistep_x0(used, h, phi_1)
    return x


@torch.no_grad()
def dpm_solver(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in the data prediction x0, NFE = S.

    The first step is first order (no history yet; it equals DDIM's eta = 0 step) and so is the final one onto
    clean data (lambda = inf: it returns the last x0), the paper's lower-order final step. Pair it with
    `timesteps.logsnr`, the paper's spacing, uniform in lambda. `clip` is off, as in the official code.
    """
    return _dpm_solver_multistep(model, x, schedule, timesteps, 2, clip)


@torch.no_grad()
def dpm_solver_3m(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
    lower_order_final: bool = LOWER_ORDER_FINAL,
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, the multistep of sec. 4 at third order; the official code's "dpmsolver++"
    multistep with order=3): orders 1, 2, then 3 from the third step, and first order onto clean data. NFE = S.

    `lower_order_final`: the step before the one onto clean data is of second order at most, as the official code
    does below 10 steps and diffusers below 15 (docs/solvers.md gives the measurements behind the default).
    """
    return _dpm_solver_multistep(model, x, schedule, timesteps, 3, clip, lower_order_final)
