"""UniPC (Zhao et al. 2023, Algorithm 3; data prediction): a multistep predictor UniP-p and the corrector UniC-p, which
re-uses the model call at the predicted point, so NFE = S. B(h) = h ("bh1") or e^h - 1 ("bh2").

Notation (code -> paper):
    lam, h           lambda = log(alpha / sigma) (schedule.half_log_snr); h = lam_s - lam_t
    r_k              (lam_k - lam_t) / h for an earlier point k (negative)
    m, x0            the data prediction, the model output m_t
    D1_k             (m_k - m_0) / r_k, the divided differences
    phi_1            e^{-h} - 1: h phi_1(h) of the exponential integrator (eq. 5 with hh = -h)
    B_h              B(h): -h for "bh1", e^{-h} - 1 for "bh2" (data prediction integrates in hh = -h)
    rho              rho_p (predictor, eq. 7) and rho_c (corrector, eq. 8): R rho = b / B(h)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..schedule import Schedule, half_log_snr, x_at
from .core import Generator, Model, denoise, steps, t_batch

__all__ = ["unipc"]

History = list[tuple[float, Tensor]]  # (lam, x0) at the visited timesteps, newest last


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
    trajectory, _ = steps(schedule, timesteps)
    history: History = []
    x_prev, abar_prev, p = x, 0.0, 1  # the last step's start and order, for its corrector
    for i, (t, s, abar_t, abar_s) in enumerate(trajectory):
        _, m = denoise(model, x, t_batch(x, t), abar_t, clip)
        if s < 0:
            return m
        if abar_t == 0:  # pure noise (zero terminal SNR), lambda = -inf: DDIM's step from the model's x0, uncorrected
            x = x_at(m, x, abar_s)  # sigma_t = 1, so x_t is its own noise
            continue
        lam_t = half_log_snr(abar_t)
        if history:  # UniC: correct the last prediction with the model call just taken there (its x0 stays m)
            x = _unipc_update(x_prev, history, lam_t, abar_prev, abar_t, p, variant, m_s=m)
        history = [*history[len(history) + 1 - order :], (lam_t, m)]
        p = min(len(history), len(trajectory) - i)  # min(order, points so far, steps left)
        x_prev, abar_prev = x, abar_t
        x = _unipc_update(x, history, half_log_snr(abar_s), abar_t, abar_s, p, variant)
    return x
