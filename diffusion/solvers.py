"""Log-SNR ODE solvers: exponential integrators of the probability-flow ODE in the data prediction x0, stepping in
lambda = log(alpha / sigma). Same contract as every sampler (see diffusion.samplers, which holds the shared pieces
and the other samplers, and re-exports these three):

    sampler(model, x, schedule, timesteps, *, generator=None, **options) -> x0

    dpm_solver      DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), NFE = S
    dpm_solver_3m   DPM-Solver++(3M), the same multistep at third order, NFE = S
    unipc           UniPC (Zhao et al. 2023): predictor UniP-p plus corrector UniC-p, B(h) = h ("bh1") or e^h - 1
                    ("bh2"), NFE = S

Each step goes from t to s (s = -1 after the last: clean data). The step onto clean data (lambda = inf) is first
order for all three: it returns the last x0, the papers' lower-order final step onto t = 0 taken to its limit. The
multistep history is a local list of (lambda, x0), newest last; its coefficients are Python floats computed once per
step from the float64 schedule. Pair them with `timesteps.logsnr`, the papers' spacing, uniform in lambda.

Notation (code -> papers):
    alpha, sigma     sqrt(abar), sqrt(1 - abar); lam = log(alpha / sigma), half the log-SNR
    h                lam_s - lam_t, the step
    r_k              UniPC: (lam_k - lam_t) / h for an earlier point k (negative); DPM-Solver++: r_0, r_1 = h_0 / h,
                     h_1 / h, the last two steps over this one (positive)
    m, x0            the data prediction x_theta(x_t, t) (DPM-Solver++ eq. 8; UniPC's model output m_t)
    D1_k             (m_k - m_0) / r_k, the divided differences of UniPC (DPM-Solver++ builds D1, D2 alike)
    phi_1            e^{-h} - 1: h phi_1(h) of the exponential integrator (UniPC eq. 5 with hh = -h)
    B_h              B(h): -h for "bh1", e^{-h} - 1 for "bh2" (data prediction integrates in hh = -h)
    rho              UniPC's coefficients rho_p (predictor, eq. 7) and rho_c (corrector, eq. 8): R rho = b / B(h)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .samplers import Generator, Model, _at, _predict_x0, _steps
from .schedule import Schedule

__all__ = ["dpm_solver", "dpm_solver_3m", "unipc"]

History = list[tuple[float, Tensor]]  # (lam, x0) at the visited timesteps, newest last
LOWER_ORDER_FINAL = True  # dpm_solver_3m's default, decided on the exact mixtures: benchmarks/lower_order_final.py


def _lam(abar: float) -> float:
    """lambda = log(alpha / sigma) of a timestep whose alpha_bar is `abar` (< 1)."""
    return 0.5 * math.log(abar / (1 - abar))


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
    steps, _ = _steps(schedule, timesteps)
    history: History = []
    for i, (t, s, abar_t, abar_s) in enumerate(steps):
        x0 = _predict_x0(x, model(x, _at(x, t)), abar_t, clip)
        if s < 0:
            return x0
        lam_t = _lam(abar_t)
        history = [*history[len(history) + 1 - order :], (lam_t, x0)]
        h = _lam(abar_s) - lam_t
        phi_1 = math.expm1(-h)
        used = history[-(len(steps) - i) :] if lower_final else history
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
    does below 10 steps and diffusers below 15 (docs/sampling.md gives the measurements behind the default).
    """
    return _dpm_solver_multistep(model, x, schedule, timesteps, 3, clip, lower_order_final)


# -------------------------------------------------------------------- UniPC (Zhao et al. 2023)
def _unipc_update(
    x: Tensor,
    history: History,
    lam_s: float,
    abar_t: float,
    abar_s: float,
    order: int,
    variant: str,
    m_s: Tensor | None = None,
) -> Tensor:
    """x_s from x_t by UniP-`order` (m_s None: eq. 7) or UniC-`order` (m_s, the x0 taken at the predicted x_s:
    eq. 8) with B(h) of `variant`, from the newest `order` points of `history` (the newest is t)."""
    lam_0, m_0 = history[-1]
    h = lam_s - lam_0
    hh = -h  # data prediction integrates in -lambda
    phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else phi_1  # any B(h) = O(h) keeps the order (the paper's Theorem 3.1)
    # b_k = k! phi_{k+1}(hh) / B(h), k = 1..order, with phi's recursion phi_{k+1} = (phi_k - 1/k!) / hh (eq. 5)
    b, phi_k, factorial = [], phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(phi_k * factorial / B_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    earlier = history[-order:-1][::-1]  # the order - 1 points before t, newest first
    r = [(lam_k - lam_0) / h for lam_k, _ in earlier] + [1.0]  # r = 1: the point s itself
    d1 = [(m_k - m_0) / r_k for (_, m_k), r_k in zip(earlier, r, strict=False)]
    R = [[r_k**i for r_k in r] for i in range(order)]  # the paper's R_p: powers of r, one row per power
    if m_s is None:  # predictor: the order - 1 earlier differences; the papers take rho = 1/2 at order 2
        rho = [0.5] if order == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    else:  # corrector: the new point's difference as well; rho = 1/2 at order 1
        rho = [0.5] if order == 1 else _solve(R, b)
        d1.append(m_s - m_0)
    x = ((1 - abar_s) / (1 - abar_t)) ** 0.5 * x - abar_s**0.5 * phi_1 * m_0
    for rho_k, d1_k in zip(rho, d1, strict=True):
        x = x - (abar_s**0.5 * B_h * rho_k) * d1_k
    return x


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b for UniPC's small system R rho = b (at most 3 x 3), in float64 on the host (no device sync)."""
    if not a:
        return []
    return torch.linalg.solve(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


@torch.no_grad()
def unipc(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    order: int = 3,
    variant: str = "bh2",
    clip: bool = False,
) -> Tensor:
    """UniPC-`order` (Zhao et al. 2023, Algorithm 3; data prediction): a multistep predictor UniP, then the corrector
    UniC, which re-uses the model call at the predicted point, so NFE = S. `variant` picks B(h): "bh1", B(h) = h
    (the official code's default; the paper finds it better for unconditional sampling at few steps), or "bh2",
    B(h) = e^h - 1 (diffusers' default; the paper's choice for guided sampling).

    Orders rise from 1 as the history fills and fall again towards the end (min(order, i + 1, S - i) at step i, as
    the official code and diffusers); the step onto clean data is first order and returns the model's x0 taken at
    the last predicted point, so no corrector runs after it (any correction there is multiplied by sigma = 0).
    Order 1 is DDIM with a corrector, 2 (diffusers' default) and 3 (the paper's advice for unconditional models).
    """
    if type(order) is not int or order not in (1, 2, 3):
        raise ValueError(
            f"order must be 1, 2 or 3 (UniPC-p: a predictor of order p, p + 1 with its corrector), got {order!r}"
        )
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1), got {variant!r}")
    steps, _ = _steps(schedule, timesteps)
    history: History = []
    x_prev, abar_prev, p = x, 0.0, 1  # the last step's start and order, for its corrector
    for i, (t, s, abar_t, abar_s) in enumerate(steps):
        m = _predict_x0(x, model(x, _at(x, t)), abar_t, clip)
        if s < 0:
            return m
        lam_t = _lam(abar_t)
        if history:  # UniC: correct the last prediction with the model call just taken there (its x0 stays m)
            x = _unipc_update(x_prev, history, lam_t, abar_prev, abar_t, p, variant, m_s=m)
        history = [*history[len(history) + 1 - order :], (lam_t, m)]
        p = min(order, i + 1, len(steps) - i)
        x_prev, abar_prev = x, abar_t
        x = _unipc_update(x, history, _lam(abar_s), abar_t, abar_s, p, variant)
    return x
