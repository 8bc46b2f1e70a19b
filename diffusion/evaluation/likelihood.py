"""Negative log-likelihood in bits/dim through the variational bound of a respaced DDPM chain (Ho et al. 2020, eq. 5;
Bao et al. 2022 sec. 6 for the analytic variance and K < T steps).

For timesteps tau_K > ... > tau_1 the bound is

    L = KL(q(x_tauK | x0) || N(0, I))                                   the prior term
      + sum_k E_q KL(q(x_tau(k-1) | x_tauk, x0) || p(x_tau(k-1) | x_tauk))   one Monte Carlo draw of x_tauk per step
      - E_q log p(x0 | x_tau1)                                           the decoder

with p's mean the DDPM posterior mean at the model's x0 (DDIM's eta = 1 step, diffusion.sampling.core.ddim_step) and its
variance beta-tilde ("posterior"), beta ("beta") or Analytic-DPM's ("analytic"). The decoder is Ho et al.'s
discretised Gaussian for 8-bit images in [-1, 1], or a Gaussian density for continuous data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sampling.analytic import check_gamma, cov_bound, reverse_variance
from ..sampling.core import Generator, Model, ddim_step, denoise, randn_like, steps, t_batch
from ..schedule import Schedule, x_at

__all__ = ["nll_bound", "VARIANCES", "DECODERS"]

VARIANCES = ("posterior", "beta", "analytic")
DECODERS = ("discrete", "gaussian")


@torch.no_grad()
def nll_bound(
    model: Model,
    x0: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    variance: str = "analytic",
    gamma: Tensor | None = None,
    clip: bool = True,
    decoder: str = "discrete",
    generator: Generator = None,
    data_var: float | None = None,
) -> Tensor:
    """The bound L above for each image of x0 [N, C, H, W], in bits/dim: [N] float64.

    Args:
        variance: "posterior" (beta-tilde), "beta" or "analytic" (needs `gamma`, [T]).
        clip: data lie in [-1, 1]: x0 clamped to it (as the official code) and Theorem 2's bound for bounded data.
        data_var: the data's variance per dimension, the analytic variance's bound when clip is off
            (diffusion.sampling.analytic.cov_bound; required then).
        decoder: "discrete" (8-bit images: x0 on the grid -1 + 2k / 255) or "gaussian" (continuous data).

    The decoder's variance: analytic, the estimate of Cov[x0 | x_tau1] (the analytic variance of the step onto
    clean data, clipped); plain, beta-tilde_1 if tau_1 = 0 (Ho et al.'s clipped log-variance; the official code
    uses it for the analytic variance too), else 1 - alpha_bar at tau_1 (the official code's choice).
    """
    if variance not in VARIANCES or decoder not in DECODERS:
        raise ValueError(f"variance must be one of {VARIANCES} and decoder one of {DECODERS}, got {variance!r}, "
                         f"{decoder!r}")  # fmt: skip
    g = check_gamma(gamma, schedule.T).tolist() if variance == "analytic" else None
    bound = cov_bound(clip, data_var) if variance == "analytic" else None
    trajectory, abar = steps(schedule, timesteps)
    x0 = x0.double()
    a = trajectory[0][2]  # prior term at the first visited timestep: KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) per dim
    nats = 0.5 * (a * x0**2 - a - math.log(1 - a)).flatten(1).sum(1)
    for t, s, abar_t, abar_s in trajectory:
        noise = randn_like(x0, generator)
        x = x_at(x0, noise, abar_t)
        eps, x0_p = (v.double() for v in denoise(model, x.to(torch.get_default_dtype()), t_batch(x, t), abar_t))
        if s >= 0:
            mean_q = ddim_step(x, noise, abar_t, abar_s, eta=1.0, std=0.0, x0=x0)  # the posterior mean at the true x0
            mean_p = ddim_step(x, eps, abar_t, abar_s, eta=1.0, std=0.0, clip=clip, x0=x0_p)
            lam2 = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
            if variance == "analytic":
                sigma2, _ = reverse_variance(abar_t, abar_s, g[t], bound=bound)
            else:
                sigma2 = lam2 if variance == "posterior" else 1 - abar_t / abar_s
            kl = 0.5 * ((lam2 + (mean_q - mean_p) ** 2) / sigma2 - 1 + math.log(sigma2 / lam2))
            nats = nats + kl.flatten(1).sum(1)
        else:
            mean = x0_p.clamp(-1, 1) if clip else x0_p
            nats = nats - _decoder_log_likelihood(x0, mean, _decoder_variance(variance, t, abar, g, bound), decoder)
    return nats / (x0[0].numel() * math.log(2))


def _decoder_variance(variance: str, t: int, abar: list, gamma: list | None, bound: float | None) -> float:
    if variance == "analytic":
        sigma2, _ = reverse_variance(abar[t], 1.0, gamma[t], bound=bound)
        return max(float(sigma2), 1e-12)  # a Gamma estimated at 1 would make it 0: a point mass
    if t == 0:  # beta-tilde of the step 1 -> 0: what Ho et al. use at t = 0, where beta-tilde itself is 0
        return (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])
    return 1 - abar[t]


def _decoder_log_likelihood(x0: Tensor, mean: Tensor, sigma2: float, decoder: str) -> Tensor:
    """log p(x0 | x_tau1) per image: Ho et al.'s discretised Gaussian (bins of width 2 / 255, the two end bins
    open) or a Gaussian density."""
    if decoder == "gaussian":
        return (-0.5 * ((x0 - mean) ** 2 / sigma2 + math.log(2 * math.pi * sigma2))).flatten(1).sum(1)
    std = sigma2**0.5
    upper, lower = (x0 - mean + 1 / 255) / std, (x0 - mean - 1 / 255) / std
    inside = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    log_p = torch.where(x0 < -0.999, torch.special.log_ndtr(upper),
                        torch.where(x0 > 0.999, torch.special.log_ndtr(-lower), inside))  # fmt: skip
    return log_p.flatten(1).sum(1)
