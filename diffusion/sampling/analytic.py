"""Analytic-DPM (Bao et al., ICLR 2022): the optimal reverse variance from the model's own eps, and its trajectory.

Notation (code -> paper; 0-based timesteps as everywhere here, s = -1 is clean data):
    gamma[t]     Gamma_n = E_{q(x_n)} ||eps_theta(x_n, n)||^2 / d          (Theorem 1; estimated by Monte Carlo)
    cov          (1 - abar_t) / abar_t (1 - Gamma_t): the estimate of Cov[x0 | x_t] per dimension
    lam2         lambda^2 of the step t -> s: eta^2 beta-tilde_{s|t} (DDIM eq. 16; eta = 1 is DDPM's posterior)
    coef         (sqrt(abar_s) - sqrt((1 - abar_s - lam2) abar_t / (1 - abar_t)))^2, the weight of cov in sigma*^2
    sigma2       sigma*^2 = lam2 + coef cov (Theorem 1), clipped to Theorem 2's bounds
    bound        the data's bound on Cov[x0 | x_t] per dimension (Theorem 2's second bound; `cov_bound`)
    data_var     tr Cov[x0] / d, the data's variance per dimension: that bound for unbounded data
    J(s, t)      the per-dimension KL of one step with that variance; the trajectory minimises their sum (sec. 4)

The samplers keep the sampler contract and reuse DDIM's step (diffusion.sampling.core.ddim_step): the mean is the
family's usual mean, only the std of the fresh noise changes. Gamma is computed once per model and cached beside
the checkpoint (diffusion.io.gamma_cache).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .. import timesteps as spacings
from ..errors import UsageError
from ..schedule import Schedule, x_at
from ..timesteps import check_start
from .core import Generator, Model, ddim_step, denoise, steps, t_batch

__all__ = ["analytic_ddpm", "analytic_ddim", "estimate_gamma", "data_variance", "check_gamma", "cov_bound",
           "reverse_variance", "step_kl", "optimal_trajectory", "cost_matrix", "timesteps_for"]  # fmt: skip

# 8-bit images in [-1, 1]: one level is 2 / 255; E|sigma eps| = sigma sqrt(2 / pi) for eps ~ N(0, 1)
LEVEL = 2 / 255


# -------------------------------------------------------------------- Gamma by Monte Carlo
@torch.no_grad()
def estimate_gamma(
    model: Model,
    x0: Tensor,
    schedule: Schedule,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Gamma_t = mean over the M images x0 [M, C, H, W] of ||eps_theta(x_t, t)||^2 / d, x_t ~ q(x_t | x0), at every
    t = 0 .. T-1 (Bao et al. eq. 8): [T] float64. One fresh noise per (image, t); batches mix timesteps, so the
    cost is T M / batch_size calls. The same generator seed and batch size give the same Gamma."""
    if x0.ndim < 2 or len(x0) == 0:
        raise ValueError(f"x0 must hold at least one image [M, C, H, W], got shape {tuple(x0.shape)}")
    T, M = schedule.T, len(x0)
    abar = schedule.alphas_cumprod.to(x0.device)
    total = torch.zeros(T, dtype=torch.float64, device=x0.device)
    pairs = T * M  # pair p is (t = p // M, image p % M)
    for start in tqdm(range(0, pairs, batch_size), desc="Gamma (Analytic-DPM)", disable=not progress, unit="batch"):
        p = torch.arange(start, min(start + batch_size, pairs), device=x0.device)
        t, images = p // M, x0[p % M]
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x0.device).to(x0.device)  # fmt: skip
        a = abar[t].view(-1, *[1] * (images.ndim - 1))
        x = x_at(images.double(), noise.double(), a).to(images.dtype)
        eps = model(x, t)
        total.index_add_(0, t, eps.double().pow(2).flatten(1).mean(1))
    return (total / M).cpu()


def data_variance(x0: Tensor) -> float:
    """tr Cov[x0] / d of the images x0 [M, C, H, W] (unbiased: M - 1), the data's variance per dimension: Theorem 2's
    bound for unbounded data (`cov_bound`). Computed from the very images Gamma is estimated on. inf for M = 1 (one
    image says nothing about the spread: no bound)."""
    if x0.ndim < 2 or len(x0) == 0:
        raise ValueError(f"x0 must hold at least one image [M, C, H, W], got shape {tuple(x0.shape)}")
    return math.inf if len(x0) == 1 else float(x0.double().var(0, correction=1).mean())


def check_gamma(gamma: Tensor, T: int, where: str = "gamma") -> Tensor:
    """`gamma` as float64 [T] if it is one, else ValueError naming what is wrong (shape, dtype, non-finite)."""
    if not isinstance(gamma, Tensor):
        raise ValueError(f"{where} must be a tensor [T={T}] from cached_gamma or estimate_gamma, got "
                         f"{type(gamma).__name__}: the analytic samplers need the model's Gamma")  # fmt: skip
    if gamma.shape != (T,) or not gamma.is_floating_point():
        raise ValueError(f"{where} must be a float tensor of shape [T={T}], got {gamma.dtype} {tuple(gamma.shape)}")
    if not bool(torch.isfinite(gamma).all()) or bool((gamma < 0).any()):
        raise ValueError(f"{where} must be finite and >= 0 (a mean square), got min {float(gamma.min())}")
    return gamma.detach().to("cpu", torch.float64)


# -------------------------------------------------------------------- Theorems 1 and 2
def cov_bound(clip: bool, data_var: float | None) -> float:
    """The data's upper bound on Cov[x0 | x_t] per dimension (Theorem 2's second bound), applied at every step.

    clip (data in [-1, 1]): ((b - a) / 2)^2 = 1, the paper's bound and its code's, kept so that published settings
    reproduce. Otherwise the data's variance `data_var` (`data_variance`): by the law of total variance
    E_{x_t} tr Cov[x0 | x_t] / d <= tr Cov[x0] / d, and that expectation is exactly what Gamma estimates
    ((1 - abar_t) / abar_t (1 - Gamma_t)), so the bound holds for any data. Without it only (1 - abar_t) / abar_t is
    left, ~1e8 at the noisy end of the cosine schedule, where a 1% Monte Carlo error in Gamma becomes a huge variance.
    """
    if clip:
        return 1.0
    if data_var is None:
        raise ValueError("unclipped Analytic-DPM needs the data's variance data_var (tr Cov[x0] / d) to bound "
                         "Cov[x0 | x_t]: pass the one cached_gamma returns beside Gamma (or data_variance of the "
                         "same images); math.inf keeps only the (1 - abar) / abar bound")  # fmt: skip
    if not data_var > 0:
        raise ValueError(f"data_var must be > 0 (the data's variance per dimension), got {data_var}")
    return float(data_var)


def reverse_variance(abar_t, abar_s, gamma_t, eta=1.0, *, bound: float = 1.0, raw: bool = False):
    """(sigma2, lam2) of the step t -> s: Theorem 1's sigma*^2 = lam2 + coef cov, clipped to Theorem 2's bounds
    [lam2, lam2 + coef min((1 - abar_t) / abar_t, bound)]; `bound` is the data's (`cov_bound`: 1 for data in
    [-1, 1]); `raw` skips the clipping.

    Works on floats, numpy arrays and tensors alike (broadcast). abar_s = 1 is the step onto clean data (lam2 = 0,
    coef = 1: sigma2 is then the estimate of Cov[x0 | x_t] itself)."""
    lam2 = eta**2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)  # beta-tilde respaced (DDIM eq. 16)
    root = ((1 - abar_s - lam2) * abar_t / (1 - abar_t)) ** 0.5
    coef = (abar_s**0.5 - root) ** 2
    cov = (1 - abar_t) / abar_t * (1 - gamma_t)
    if not raw:  # Theorem 2: 0 <= Cov[x0 | x_t] <= (1 - abar_t) / abar_t, and <= the data's bound
        top = (1 - abar_t) / abar_t
        top = np.minimum(top, bound) if not isinstance(top, Tensor) else top.clamp(max=bound)
        cov = np.clip(cov, 0.0, top) if not isinstance(cov, Tensor) else torch.minimum(cov.clamp(min=0.0), top)
    return lam2 + coef * cov, lam2


def step_kl(abar_t, abar_s, gamma_t, sigma2, eta=1.0, *, bound: float = 1.0):
    """E KL(q(x_s | x_t, x0) || p(x_s | x_t)) per dimension for the family's mean with x0 = E[x0 | x_t] and reverse
    variance sigma2: 0.5 (sigma*^2 / sigma2 - 1 + log(sigma2 / lam2)) (Theorem 1's proof: the mean's squared error
    is coef Cov[x0 | x_t]), 0.5 log(sigma*^2 / lam2) at sigma2 = sigma*^2. Cov is taken within Theorem 2's bounds,
    so that a Gamma estimated above 1 cannot make a KL negative."""
    optimal, lam2 = reverse_variance(abar_t, abar_s, gamma_t, eta, bound=bound)
    return 0.5 * (optimal / sigma2 - 1 + np.log(sigma2 / lam2))


# -------------------------------------------------------------------- the samplers
def _noise_cap(noise_cap, clip: bool, images: float) -> float | None:
    """The cap in 8-bit levels: `images` levels for "auto" with clip (data in [-1, 1]: 8-bit images), none for
    "auto" without (unbounded data, where a cap in image levels means nothing and cost most of Analytic-DPM's gain on
    the mixture: Frechet 0.231 against 0.030 at K = 10); None: none; a number >= 0: that many."""
    if noise_cap == "auto":
        return images if clip else None
    if noise_cap is not None and (isinstance(noise_cap, bool) or not isinstance(noise_cap, int | float)
                                  or not noise_cap >= 0):  # fmt: skip
        raise ValueError(f"noise_cap must be 'auto', null or a number of 8-bit levels >= 0, got {noise_cap!r}")
    return noise_cap


def _analytic(model, x, schedule, timesteps, generator, gamma, eta, clip, noise_cap, data_var) -> Tensor:
    gamma, bound = check_gamma(gamma, schedule.T).tolist(), cov_bound(clip, data_var)
    trajectory, abar = steps(schedule, timesteps)
    last = trajectory[-1][0]  # the last visited timestep: the step onto it gets noise_cap
    cap = math.inf if noise_cap is None else (noise_cap * LEVEL * math.sqrt(math.pi / 2)) ** 2
    for t, s, abar_t, abar_s in trajectory:
        eps, x0 = denoise(model, x, t_batch(x, t), abar_t)
        if s < 0:  # the last step returns the mean (no noise), as DDPM's Algorithm 2 and the official code
            return ddim_step(x, eps, abar_t, abar_s, eta=eta, std=0.0, clip=clip, x0=x0)
        if abar_t == 0:  # pure noise (zero terminal SNR): x_t says nothing about x0, so Cov[x0 | x_t] is the data's
            lam2 = eta**2 * (1 - abar_s)
            sigma2 = lam2 + abar_s * bound
        else:
            sigma2, _ = reverse_variance(abar_t, abar_s, gamma[t], eta, bound=bound)
        std = math.sqrt(min(sigma2, cap) if s == last else sigma2)
        x = ddim_step(x, eps, abar_t, abar_s, eta=eta, std=std, clip=clip, generator=generator, x0=x0)
    return x


@torch.no_grad()
def analytic_ddpm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    gamma: Tensor | None = None,
    clip: bool = True,
    noise_cap: float | Literal["auto"] | None = "auto",
    data_var: float | None = None,
) -> Tensor:
    """Analytic-DDPM (Bao et al. 2022, Theorem 1 with lambda^2 = beta-tilde, clipped by Theorem 2): DDPM's posterior
    mean, noise of std sigma*, the last step the mean. NFE = S.

    Args:
        gamma: [T] float64, the model's Gamma (diffusion.io.gamma_cache.cached_gamma or `estimate_gamma`; required).
        clip: data lie in [-1, 1]: clamp x0 to it (the official code always does) and bound Cov[x0 | x_t] by 1
            (Theorem 2 for bounded data). Turn off for unbounded data.
        data_var: the data's variance per dimension (cached_gamma returns it beside Gamma): the bound on
            Cov[x0 | x_t] when clip is off (`cov_bound`; required then, math.inf for none).
        noise_cap: bound the noise of the step onto the last visited timestep so that E|sigma eps| is at most this
            many 8-bit levels (2 / 255 each), as the official CIFAR-10 runs (clip_pixel 2, 1 for the cosine
            schedule); "auto": 2 with clip (8-bit images), none without (unbounded data); None: no bound.
    """
    cap = _noise_cap(noise_cap, clip, 2.0)
    return _analytic(model, x, schedule, timesteps, generator, gamma, 1.0, clip, cap, data_var)


@torch.no_grad()
def analytic_ddim(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    gamma: Tensor | None = None,
    eta: float = 0.0,
    clip: bool = True,
    noise_cap: float | Literal["auto"] | None = "auto",
    data_var: float | None = None,
) -> Tensor:
    """Analytic-DDIM (Bao et al. 2022): DDIM's mean with sigma(eta) (Song et al. eq. 12, 16), and noise of the
    optimal std sigma* for lambda^2 = eta^2 beta-tilde, clipped by Theorem 2. eta = 0 is the paper's Analytic-DDIM:
    lambda = 0, yet sigma*^2 = coef Cov[x0 | x_t] > 0 (it is not deterministic); eta = 1 is analytic_ddpm. NFE = S.
    The options of analytic_ddpm apply ("auto" noise_cap: 1 level with clip, as the official Analytic-DDIM runs)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: the paper's Analytic-DDIM, 1: Analytic-DDPM), got {eta}")
    cap = _noise_cap(noise_cap, clip, 1.0)
    return _analytic(model, x, schedule, timesteps, generator, gamma, eta, clip, cap, data_var)


# -------------------------------------------------------------------- the optimal trajectory (sec. 4)
def optimal_trajectory(steps: int, schedule: Schedule, gamma: Tensor, *, bound: float = 1.0) -> Tensor:
    """The K = `steps` timesteps from T-1 down to 0 that minimise sum_k J(tau_{k-1}, tau_k), J the KL of one DDPM
    step with the clipped analytic variance (`cost_matrix`: Cov[x0 | x_t] non-decreasing in t), by dynamic
    programming (Bao et al. sec. 4): O(K T^2) in float64. The prior and decoder terms are fixed by the ends, as in
    the official code. Descending int64. `bound`: Cov's data bound in the cost (`cov_bound`); 1, the paper's, by
    default, also for unbounded data: on the cosine mixture the data variance there chose a worse trajectory."""
    T = schedule.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    if steps == 1 or T == 1:
        return torch.tensor([T - 1])
    if steps == 2 or steps == T:
        return torch.arange(T - 1, -1, -(T - 1) if steps == 2 else -1)
    J = cost_matrix(schedule, gamma, bound=bound)
    # C[t]: the least cost of a path 0 = tau_1 < ... < tau_k = t; row k of `back` keeps each t's best predecessor
    C = J[0].copy()  # k = 2: tau_1 = 0 -> t
    back = np.zeros((steps + 1, T), dtype=np.int64)
    for k in range(3, steps + 1):
        lo = k - 2  # a path of k - 1 steps from 0 ends at k - 2 or above
        total = C[lo:, None] + J[lo:]  # [s - lo, t]: a path ending at s, then s -> t
        best = total.argmin(0)
        C, back[k] = total[best, np.arange(T)], best + lo
    path, t = [T - 1], T - 1
    for k in range(steps, 2, -1):
        t = int(back[k, t])
        path.append(t)
    path.append(0)
    ts = torch.tensor(path, dtype=torch.int64)
    check_start(ts, schedule, "analytic_optimal")
    return ts


def cost_matrix(schedule: Schedule, gamma: Tensor, *, bound: float = 1.0, monotone: bool = True) -> np.ndarray:
    """J[s, t] for 0 <= s < t <= T-1 (inf elsewhere): `step_kl` at the clipped analytic variance, float64 [T, T].

    `monotone`: Cov[x0 | x_t] is taken as its running maximum over t. The true one never falls as t grows (x_t is
    a noisier copy of x_s, so it cannot tell more about x0), but its Monte Carlo estimate does wherever Gamma is
    within its error of 1 (the noisy end, and data close to point masses): there a Gamma estimated above 1 clips
    Cov to 0 and makes any jump down from t look free, and the trajectory would take it (on the 3x8x8 mixture
    with M = 1000: 67 bits/dim at K = 10 instead of -1.25). The official code cuts such a region out and spaces it
    evenly, a rule that fails when the region starts below T/2, as it does there (t = 174)."""
    T = schedule.T
    g = check_gamma(gamma, T).numpy()
    abar = schedule.alphas_cumprod.cpu().numpy()
    if monotone:
        cov = np.maximum.accumulate(np.clip((1 - abar) / abar * (1 - g), 0.0, None))
        g = 1 - cov * abar / (1 - abar)
    s, t = np.triu_indices(T, k=1)
    sigma2, _ = reverse_variance(abar[t], abar[s], g[t], bound=bound)
    J = np.full((T, T), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        J[s, t] = step_kl(abar[t], abar[s], g[t], sigma2, bound=bound)
    return np.where(np.isfinite(J), J, np.inf)


def timesteps_for(spacing: str, steps: int, schedule: Schedule, gamma: Tensor | None = None) -> Tensor:
    """The timesteps a sampler run takes: the optimal trajectory for spacing "analytic_optimal" (it needs the model's
    Gamma), else diffusion.timesteps.make's spacing of that name."""
    if spacing not in spacings.GAMMA_SPACINGS:
        return spacings.make(spacing, steps, schedule)
    if gamma is None:
        raise UsageError("spacing=analytic_optimal needs the model's Gamma: use it with sampler=analytic_ddpm or "
                         "sampler=analytic_ddim, which compute it")  # fmt: skip
    if schedule.zero_terminal:
        raise UsageError("spacing=analytic_optimal's costs divide by alpha_bar, which is 0 at T-1 under zero terminal "
                         "SNR: use spacing=trailing (or even)")  # fmt: skip
    return optimal_trajectory(steps, schedule, gamma)
