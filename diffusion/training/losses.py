"""Training objectives: DDPM's noise-prediction loss, and the consistency losses (CD, CT, PCM) with their teacher
steps, distances, weightings and curriculum.

    eps_loss        L_simple of Ho et al. (eq. 14)
    diffusion_loss  what the network predicts (eps, x0, v) and how its error is weighed (uniform, min-SNR)
    cd_loss      consistency distillation (Song et al. 2023, Alg. 2; PCM, Wang et al. 2024, with phases > 1)
    ct_loss      consistency training (Song et al. 2023, Alg. 3, with Song & Dhariwal 2023's improvements)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..sampling.consistency import column, ddim_to, edge_below, log_ve, make_grid, phase_edges
from ..sampling.core import Model, denoise
from ..schedule import PREDICTIONS, Schedule, eps_from_x0, target, x_at

__all__ = ["eps_loss", "diffusion_loss", "drop_labels", "loss_weight", "WEIGHTINGS", "dpm_solver_step", "SOLVERS",
           "DISTANCES", "distance", "cd_loss", "ct_loss", "ct_steps", "lognormal_weights"]  # fmt: skip


def eps_loss(model: nn.Module, schedule: Schedule, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """L_simple of Ho et al. (eq. 14): t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), MSE(eps, model(x_t, t))."""
    return diffusion_loss(model, schedule, x0, generator=generator)


# -------------------------------------------------------------------- what the network predicts, how it is weighed
# With SNR = alpha_bar / (1 - alpha_bar), the squared errors of the three targets at one x_t are tied by
#     |eps_hat - eps|^2 = SNR |x0_hat - x0|^2,    |v_hat - v|^2 = (SNR + 1) |x0_hat - x0|^2,
# so Min-SNR-gamma (Hang et al. 2023: the x0 loss weighted by min(SNR, gamma)) is each target's own MSE weighted by
#     x0: min(SNR, gamma),    eps: min(SNR, gamma) / SNR = min(1, gamma / SNR),    v: min(SNR, gamma) / (SNR + 1),
# all finite at both ends (SNR -> 0, also SNR = 0 under zero terminal SNR, and SNR -> inf).
WEIGHTINGS = ("uniform", "min_snr")


def loss_weight(prediction: str, weighting: str, snr: Tensor, gamma: float = 5.0) -> Tensor:
    """The per-sample weight [B] of a `prediction` target's MSE: 1 ("uniform": each target's L_simple) or the one that
    makes it the min(SNR, gamma)-weighted x0 error ("min_snr", Hang et al. 2023); finite for every SNR >= 0."""
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if prediction == "x0":
        return snr.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR; 1 as SNR -> 0 (gamma / 0 = inf, clamped)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")


def diffusion_loss(model: nn.Module, schedule: Schedule, x0: Tensor, *, prediction: str = "eps",
                   weighting: str = "uniform", gamma: float = 5.0, generator: torch.Generator | None = None,
                   y: Tensor | None = None) -> Tensor:  # fmt: skip
    """t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), and the `weighting`-weighted MSE between the network's output and
    its `prediction` target (eps: Ho et al. eq. 14; x0; v: Salimans & Ho 2022). The raw network, not a wrapper;
    with labels y [B], the conditional network's `model(x_t, t, y)`."""
    t = torch.randint(0, schedule.T, (len(x0),), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    abar = schedule.alpha_bar(t)  # float64 [B]
    x_t = schedule.q_sample(x0, t, noise)
    wanted = target(prediction, x0.float(), noise.float(), abar.float().view(-1, *[1] * (x0.ndim - 1)))
    out = model(x_t, t) if y is None else model(x_t, t, y)
    error = (out.float() - wanted).pow(2).flatten(1).mean(1)
    if weighting == "uniform":
        return error.mean()
    snr = abar / (1 - abar)  # inf at t = -1 only, which is never drawn; 0 at T-1 under zero terminal SNR
    return (loss_weight(prediction, weighting, snr, gamma).float() * error).mean()


def drop_labels(y: Tensor, p: float, null: int, generator: torch.Generator | None = None) -> Tensor:
    """y with each label replaced by `null` ("no label") with probability p: one network learns the conditional and
    the unconditional model (Ho & Salimans 2022, Alg. 1: p_uncond)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, null), y)


# -------------------------------------------------------------------- the teacher's ODE steps (CD)
def dpm_solver_step(model: Model, schedule: Schedule, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DPM-Solver++(2S) step from t to s (Lu et al. 2022, Alg. 1) with the midpoint m = (t + s) // 2, in
    lambda r = (lam_m - lam_t) / h: D = (1 - 1/2r) x0_t + 1/2r x0_m; the update is DDIM's with x0 = D. Onto clean
    data (s = -1) it returns x0_t, the lower-order final step of sampling.dpm_solver. Two model calls."""
    abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    m = torch.where(s >= 0, torch.div(t + s, 2, rounding_mode="floor"), t)  # never -1: no call at clean data
    abar_m = schedule.alpha_bar(m)
    eps, x0_t = denoise(model, x, t, column(abar_t, x))
    u = x_at(x0_t, eps, column(abar_m, x))  # the first-order (DDIM) step to the midpoint
    _, x0_m = denoise(model, u, m, column(abar_m, x))
    clean = s < 0  # lambda = -log s: h = lambda_s - lambda_t
    h = torch.where(clean, torch.ones_like(abar_t), log_ve(abar_t) - log_ve(abar_s))
    r = torch.where(clean, torch.ones_like(abar_t), (log_ve(abar_t) - log_ve(abar_m)) / h)
    d = (1 - 1 / (2 * column(r, x))) * x0_t + 1 / (2 * column(r, x)) * x0_m
    d = torch.where(column(clean, x).bool(), x0_t, d)
    return x_at(d, eps_from_x0(x, d, column(abar_t, x)), column(abar_s, x))


SOLVERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim_to, "dpm_solver": dpm_solver_step}


# -------------------------------------------------------------------- distances and losses
Distance = Callable[[Tensor, Tensor], Tensor]  # (a, b) -> per-sample distance [B]


def distance(loss: str | Distance, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample distance [B]: "l2" the mean squared error (LCM), "pseudo_huber" sqrt(|a - b|^2 + c^2) - c with
    c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, sec. 3.3), or a callable (a, b) -> [B] such as
    diffusion.evaluation.lpips.LPIPS (Song et al. 2023's CD on images; it needs weight files, so the caller builds
    it: ConsistencyModule)."""
    if callable(loss):
        return loss(a, b)
    diff = (a - b).flatten(1)
    diff = diff.float() if diff.element_size() < 4 else diff  # bf16 / fp16 outputs: the distance in fp32
    if loss == "l2":
        return diff.pow(2).mean(1)
    if loss == "pseudo_huber":
        c = 0.00054 * diff.shape[1] ** 0.5
        return (diff.pow(2).sum(1) + c**2).sqrt() - c
    raise ValueError(f"unknown consistency loss {loss!r}: choose l2 or pseudo_huber, or pass a callable (LPIPS)")


DISTANCES = ("l2", "pseudo_huber", "lpips")  # lpips: diffusion.evaluation.lpips.LPIPS, built by ConsistencyModule
Consistency = Callable[[Tensor, Tensor, Tensor], Tensor]  # f(x, t, edge)


def cd_loss(f: Consistency, f_target: Consistency, teacher: Model, schedule: Schedule, x0: Tensor, *, N: int,
            k: int = 1, phases: int = 1, solver: str = "ddim", loss: str | Distance = "l2", grid: str = "karras",
            weighting: bool = False, generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Consistency distillation (Song et al. 2023, Alg. 2; PCM with phases > 1): n ~ U{0..N-k} on the `grid`
    discretization (make_grid), x_hi = q_sample(x0, t_{n+k}), x_lo = the teacher's `solver` step to t_n (not below
    the phase edge e of t_{n+k}); the loss is lambda d(f(x_hi, t_{n+k}, e), f_target(x_lo, t_lo, e)), the target
    without gradients, lambda = 1 (Song et al. 2023) or with `weighting` 1 / (s_hi - s_lo) in the VE noise level
    (Song & Dhariwal 2023 sec. 3.2: each interval's pull in proportion to how little its ends differ)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if not 1 <= k <= N:
        raise ValueError(f"the skipping step k={k} must lie in 1..N={N}")
    ts, edges = make_grid(grid, N, schedule).to(x0.device), phase_edges(phases, schedule.T).to(x0.device)
    n = torch.randint(0, N - k + 1, (len(x0),), device=x0.device, generator=generator)
    t_hi = ts[n + k]
    edge = edge_below(t_hi, edges)
    t_lo = torch.maximum(ts[n], edge)
    z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_hi = x_at(x0, z, column(schedule.alpha_bar(t_hi), x0))
    with torch.no_grad():
        target = f_target(SOLVERS[solver](teacher, schedule, x_hi, t_hi, t_lo), t_lo, edge)
    d = distance(loss, f(x_hi, t_hi, edge), target)
    return (d / _ve_gap(schedule, t_lo, t_hi).to(d) if weighting else d).mean()


def _ve_gap(schedule: Schedule, t_lo: Tensor, t_hi: Tensor) -> Tensor:
    """s(t_hi) - s(t_lo) [B], s = sigma / alpha the VE noise level (0 at clean data): iCT's lambda is its inverse."""
    return log_ve(schedule.alpha_bar(t_hi)).exp() - log_ve(schedule.alpha_bar(t_lo)).exp()


def lognormal_weights(ts: Tensor, schedule: Schedule, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """P(n) for the interval [t_n, t_{n+1}] of the grid ts [N + 1], n = 0..N-1: erf((ln s_{n+1} - P_mean) / (sqrt 2
    P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std)) normalised, with s = sigma / alpha the VE noise level (Song &
    Dhariwal 2023 sec. 3.5)."""
    abar = schedule.alpha_bar(ts.cpu()).cpu()
    cdf = torch.erf((log_ve(abar) - p_mean) / (math.sqrt(2) * p_std))  # s_0 = 0: erf = -1
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ct_loss(f: Consistency, f_target: Consistency, schedule: Schedule, x0: Tensor, *, N: int,
            loss: str | Distance = "pseudo_huber", lognormal: bool = True, weighting: bool = True, grid: str = "karras",
            generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Consistency training (Song et al. 2023, Alg. 3): x_lo and x_hi from the same x0 and z at t_n and t_{n+1}, loss
    lambda d(f(x_hi, t_{n+1}), f_target(x_lo, t_n)); with Song & Dhariwal 2023's n ~ `lognormal_weights` and
    lambda = 1 / (s_{n+1} - s_n) (`weighting`; else n uniform and lambda = 1)."""
    ts = make_grid(grid, N, schedule).to(x0.device)
    if lognormal:
        p = lognormal_weights(ts, schedule).to(x0.device)
        n = torch.multinomial(p, len(x0), replacement=True, generator=generator)
    else:
        n = torch.randint(0, N, (len(x0),), device=x0.device, generator=generator)
    t_lo, t_hi = ts[n], ts[n + 1]
    z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    abar_lo, abar_hi = schedule.alpha_bar(t_lo), schedule.alpha_bar(t_hi)
    edge = torch.full_like(t_lo, -1)
    with torch.no_grad():
        target = f_target(x_at(x0, z, column(abar_lo, x0)), t_lo, edge)
    d = distance(loss, f(x_at(x0, z, column(abar_hi, x0)), t_hi, edge), target)
    return (d / _ve_gap(schedule, t_lo, t_hi).to(d) if weighting else d).mean()


def ct_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1), K' = floor(K / (log2 floor(s1 / s0) + 1)): the improved CT curriculum
    (Song & Dhariwal 2023 eq. 8, counting intervals; the paper's N is this + 1 points). Cap s1 at T yourself."""
    if not (K >= 1 and 1 <= s0 <= s1 and k >= 0):
        raise ValueError(f"the CT curriculum needs K >= 1, 1 <= s0 <= s1 and k >= 0, got k={k} K={K} s0={s0} s1={s1}")
    K_prime = max(1, math.floor(K / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1)
