"""Consistency models on our discrete-time VP schedules: CD, CT, PCM and multistep consistency sampling.

A consistency function f(x_t, t) maps every point of a probability-flow ODE trajectory to the trajectory's end
(Song et al. 2023). As in Latent Consistency Models (Luo et al. 2023), it is built around an eps-network:

    f(x, t) = c_skip(t) x + c_out(t) x_e(x, t),   x_e = the DDIM (eta = 0) step of the network from t to the edge e

with e = -1 (clean data: x_e is the network's x0) for CD and CT, and the phase edge below t for PCM (Wang et al.
2024), so M = 1 PCM is CD by construction. c_skip(e) = 1 and c_out(e) = 0 exactly, and f(x, e) = x exactly.
`ConsistencyModel` turns f back into an eps-model (the eps whose DDIM step from t to e lands on f), so
`consistency_sampling` is an ordinary sampler of diffusion.samplers' contract.

Notation (code -> papers):
    grid          t_0 = -1 < t_1 < ... < t_N = T-1, boundary t_0 (Song et al.'s epsilon: clean data): `karras`
                  (Song et al. 2023: rho = 7 in the VE noise level, dense near the data) or `grid`, uniform
                  t_n = round(n T / N) - 1 (timesteps.trailing; LCM's skipping step T / N)
    edges         PCM's phase edges s_0 = -1 < s_1 < ... < s_{M-1}: s_j = round(j T / M) - 1
    abar, alpha, sigma   alpha_bar_t, sqrt(abar), sqrt(1 - abar); sigma / alpha is the VE noise level of x_t / alpha
    mu            the target network's EMA rate (Song et al. 2023, Alg. 2-3; Song & Dhariwal 2023: mu = 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import samplers, timesteps
from .samplers import Generator, Model, _at, _predict_x0, _steps, randn_like
from .schedule import Schedule

__all__ = ["boundary", "grid", "karras", "GRIDS", "make_grid", "phase_edges", "edge_below", "consistency",
           "ConsistencyModel", "ddim_step", "dpm_solver_step", "SOLVERS", "DISTANCES", "distance", "cd_loss",
           "ct_loss", "ct_steps", "lognormal_weights", "consistency_sampling"]  # fmt: skip

SIGMA_DATA = 0.5  # sigma_data of the boundary coefficients (Song et al. 2023, app. C; LCM)
TIME_SCALE = 10.0  # LCM's timestep_scaling: c_out reaches 0.999 one timestep above the edge


# -------------------------------------------------------------------- the parameterization
def _col(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample float64 vector [B] as a column [B, 1, ...] in like's dtype."""
    return v.to(like.device, like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def boundary(t: Tensor, edge: Tensor | int = -1) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) in float64 for int64 t [B]: with d = TIME_SCALE (t - edge), c_skip = s^2 / (d^2 + s^2) and
    c_out = d / sqrt(d^2 + s^2), s = SIGMA_DATA (Song et al. 2023 eq. 9 in LCM's scaled time): 1 and 0 at t = edge."""
    d = TIME_SCALE * (t - torch.as_tensor(edge, device=t.device)).double()
    return SIGMA_DATA**2 / (d**2 + SIGMA_DATA**2), d / (d**2 + SIGMA_DATA**2).sqrt()


def grid(N: int, T: int) -> Tensor:
    """The ascending discretization [N + 1]: -1 (clean data, the boundary), then timesteps.trailing(N, T)."""
    if not 1 <= N <= T:
        raise ValueError(f"the consistency grid needs 1 <= N <= T={T} intervals, got N={N}")
    return torch.cat([torch.tensor([-1]), timesteps.trailing(N, T).flip(0)])


def _log_ve(abar: Tensor) -> Tensor:
    """log s, s = sigma / alpha = sqrt((1 - abar) / abar) the VE noise level: -lambda, DPM-Solver's half log-SNR
    (timesteps.half_log_snr); -inf at clean data (abar = 1)."""
    return -timesteps.half_log_snr(abar)


def karras(N: int, schedule: Schedule, rho: float = 7.0) -> Tensor:
    """Song et al. 2023's discretization [N + 1], ascending: -1 (clean data), then the timesteps nearest in log s to
    s_i = (s_min^(1/rho) + i / (N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho, i = 0 .. N-1 (Karras et al. 2022 eq. 5),
    s_t = sigma_t / alpha_t the VE noise level, s_min = s_0, s_max at timesteps.noisiest_usable (lambda >= -5.1, as
    timesteps.logsnr: the last point still T-1); repeats move up to the next free
    timestep (N = T: every timestep). Dense near the data, where the last step onto it must keep the spread."""
    T = schedule.T
    if not 1 <= N <= T:
        raise ValueError(f"the consistency grid needs 1 <= N <= T={T} intervals, got N={N}")
    if N == 1:
        return torch.tensor([-1, T - 1])
    start = timesteps.noisiest_usable(schedule)  # as timesteps.logsnr: before the cosine schedule's cliff
    abar = schedule.alphas_cumprod[: start + 1].cpu()
    log_s = _log_ve(abar).numpy()  # increasing in t
    i = np.arange(N)
    lo, hi = np.exp(log_s[0] / rho), np.exp(log_s[-1] / rho)
    s = (lo + i / (N - 1) * (hi - lo)) ** rho
    ts = np.interp(np.log(s), log_s, np.arange(start + 1, dtype=np.float64)).round().astype(np.int64)
    ts[-1] = T - 1  # sampling starts from pure noise at T-1
    return torch.cat([torch.tensor([-1]), torch.from_numpy(timesteps.spread_up(ts, T - 1))])


GRIDS = {"karras": karras, "uniform": lambda N, schedule: grid(N, schedule.T)}


def make_grid(name: str, N: int, schedule: Schedule) -> Tensor:
    """The discretization `name` (karras: Song et al. 2023; uniform: LCM's skipping step T / N) with N intervals."""
    if name not in GRIDS:
        raise ValueError(f"unknown consistency grid {name!r}: choose karras or uniform")
    return GRIDS[name](N, schedule)


def phase_edges(M: int, T: int) -> Tensor:
    """PCM's phase edges [M], ascending: -1, then round(j T / M) - 1 for j = 1 .. M-1 (M = 1: just -1)."""
    if not 1 <= M <= T:
        raise ValueError(f"PCM needs 1 <= phases <= T={T}, got phases={M}")
    return grid(M, T)[:-1]


def edge_below(t: Tensor, edges: Tensor) -> Tensor:
    """The phase edge strictly below each t [B] (t = s_j belongs to the phase that ends there)."""
    edges = edges.to(t.device)
    return edges[torch.searchsorted(edges, t, right=False) - 1]


def _to(x0: Tensor, eps: Tensor, abar: Tensor | float) -> Tensor:
    """sqrt(abar) x0 + sqrt(1 - abar) eps: q_sample (Ho et al. eq. 4) with fresh eps, DDIM's eta = 0 update (Song et
    al. 2021 eq. 12) with the predicted eps; abar a float or a column like x0."""
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * eps


def ddim_step(model: Model, schedule: Schedule, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DDIM (eta = 0) step of model(x, t) -> eps from t to s, per sample (t, s int64 [B]; s = -1: its x0)."""
    eps = model(x, t)
    return _to(_predict_x0(x, eps, _col(schedule.alpha_bar(t), x), False), eps, _col(schedule.alpha_bar(s), x))


def dpm_solver_step(model: Model, schedule: Schedule, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DPM-Solver++(2S) step from t to s (Lu et al. 2022, Alg. 1) with the midpoint m = (t + s) // 2, in
    lambda r = (lam_m - lam_t) / h: D = (1 - 1/2r) x0_t + 1/2r x0_m; the update is DDIM's with x0 = D. Onto clean
    data (s = -1) it returns x0_t, the lower-order final step of samplers.dpm_solver. Two model calls."""
    abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    m = torch.where(s >= 0, torch.div(t + s, 2, rounding_mode="floor"), t)  # never -1: no call at clean data
    abar_m = schedule.alpha_bar(m)
    eps = model(x, t)
    x0_t = _predict_x0(x, eps, _col(abar_t, x), False)
    u = _to(x0_t, eps, _col(abar_m, x))  # the first-order (DDIM) step to the midpoint
    x0_m = _predict_x0(u, model(u, m), _col(abar_m, x), False)
    clean = s < 0  # lambda = -log s: h = lambda_s - lambda_t
    h = torch.where(clean, torch.ones_like(abar_t), _log_ve(abar_t) - _log_ve(abar_s))
    r = torch.where(clean, torch.ones_like(abar_t), (_log_ve(abar_t) - _log_ve(abar_m)) / h)
    d = (1 - 1 / (2 * _col(r, x))) * x0_t + 1 / (2 * _col(r, x)) * x0_m
    d = torch.where(_col(clean, x).bool(), x0_t, d)
    return _to(d, (x - _col(abar_t, x) ** 0.5 * d) / (1 - _col(abar_t, x)) ** 0.5, _col(abar_s, x))


SOLVERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim_step, "dpm_solver": dpm_solver_step}


def consistency(net: Model, schedule: Schedule, x: Tensor, t: Tensor, edge: Tensor | int = -1) -> Tensor:
    """f(x, t) = c_skip x + c_out x_e, x_e = net's DDIM step from t to `edge` (-1: its x0); exactly x at t = edge.

    Where t = edge the network is not used (its output there, possibly non-finite, is discarded)."""
    edge = torch.as_tensor(edge, device=t.device).expand_as(t)
    at_edge = t == edge
    x_e = ddim_step(net, schedule, x, torch.where(at_edge, edge + 1, t), edge)  # any t > edge: discarded at the edge
    c_skip, c_out = boundary(t, edge)
    return torch.where(_col(at_edge, x).bool(), x, _col(c_skip, x) * x + _col(c_out, x) * x_e)


class ConsistencyModel(nn.Module):
    """A consistency function as a sampler's model: forward(x, t) -> the eps whose DDIM step from t to the phase edge
    below t lands on f(x, t) (for CD and CT, edge -1: eps = (x - sqrt(abar_t) f) / sqrt(1 - abar_t)).

    Args:
        net: the eps-network F of f (our UNet).
        phases: PCM's M (1 for CD and CT).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, phases: int = 1) -> None:
        super().__init__()
        self.net, self.schedule, self.phases = net, schedule, phases
        self.register_buffer("edges", phase_edges(phases, schedule.T), persistent=False)
        self.in_channels = getattr(net, "in_channels", None)
        self.resolution = getattr(net, "resolution", None)

    def consistency(self, x: Tensor, t: Tensor) -> Tensor:
        return consistency(self.net, self.schedule, x, t, edge_below(t, self.edges))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        edge = edge_below(t, self.edges)
        f = consistency(self.net, self.schedule, x, t, edge)
        a_t, a_e = _col(self.schedule.alpha_bar(t), x) ** 0.5, _col(self.schedule.alpha_bar(edge), x) ** 0.5
        s_t, s_e = (1 - a_t**2) ** 0.5, (1 - a_e**2) ** 0.5
        # DDIM: x_e = (a_e / a_t) x + (s_e - a_e s_t / a_t) eps, solved for eps (s / a grows with t: no zero)
        return (f - a_e / a_t * x) / (s_e - a_e * s_t / a_t)


# -------------------------------------------------------------------- distances and losses
Distance = Callable[[Tensor, Tensor], Tensor]  # (a, b) -> per-sample distance [B]


def distance(loss: str | Distance, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample distance [B]: "l2" the mean squared error (LCM), "pseudo_huber" sqrt(|a - b|^2 + c^2) - c with
    c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, sec. 3.3), or a callable (a, b) -> [B] such as diffusion.lpips.LPIPS
    (Song et al. 2023's CD on images; it needs weight files, so the caller builds it: ConsistencyModule)."""
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


DISTANCES = ("l2", "pseudo_huber", "lpips")  # lpips: diffusion.lpips.LPIPS, built by ConsistencyModule
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
    x_hi = _to(x0, z, _col(schedule.alpha_bar(t_hi), x0))
    with torch.no_grad():
        target = f_target(SOLVERS[solver](teacher, schedule, x_hi, t_hi, t_lo), t_lo, edge)
    d = distance(loss, f(x_hi, t_hi, edge), target)
    return (d / _ve_gap(schedule, t_lo, t_hi).to(d) if weighting else d).mean()


def _ve_gap(schedule: Schedule, t_lo: Tensor, t_hi: Tensor) -> Tensor:
    """s(t_hi) - s(t_lo) [B], s = sigma / alpha the VE noise level (0 at clean data): iCT's lambda is its inverse."""
    return _log_ve(schedule.alpha_bar(t_hi)).exp() - _log_ve(schedule.alpha_bar(t_lo)).exp()


def lognormal_weights(ts: Tensor, schedule: Schedule, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """P(n) for the interval [t_n, t_{n+1}] of the grid ts [N + 1], n = 0..N-1: erf((ln s_{n+1} - P_mean) / (sqrt 2
    P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std)) normalised, with s = sigma / alpha the VE noise level (Song &
    Dhariwal 2023 sec. 3.5)."""
    abar = schedule.alpha_bar(ts.cpu()).cpu()
    cdf = torch.erf((_log_ve(abar) - p_mean) / (math.sqrt(2) * p_std))  # s_0 = 0: erf = -1
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
        target = f_target(_to(x0, z, _col(abar_lo, x0)), t_lo, edge)
    d = distance(loss, f(_to(x0, z, _col(abar_hi, x0)), t_hi, edge), target)
    return (d / _ve_gap(schedule, t_lo, t_hi).to(d) if weighting else d).mean()


def ct_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1), K' = floor(K / (log2 floor(s1 / s0) + 1)): the improved CT curriculum
    (Song & Dhariwal 2023 eq. 8, counting intervals; the paper's N is this + 1 points). Cap s1 at T yourself."""
    if not (K >= 1 and 1 <= s0 <= s1 and k >= 0):
        raise ValueError(f"the CT curriculum needs K >= 1, 1 <= s0 <= s1 and k >= 0, got k={k} K={K} s0={s0} s1={s1}")
    K_prime = max(1, math.floor(K / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1)


# -------------------------------------------------------------------- sampling
@torch.no_grad()
def consistency_sampling(model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *,
                         generator: Generator = None, spacing: str | None = "trailing", noise: bool = True,
                         clip: bool = True, times: Sequence[int] | None = None) -> Tensor:  # fmt: skip
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x, t), then x = q_sample(x0, s) with fresh
    noise and again, down the timesteps; NFE = S. `model` is a ConsistencyModel (f as an eps-model).

    Args:
        spacing: the times visited: this spacing with len(timesteps) steps (default trailing: T-1, T-1-T/S, ..., the
            grid the model was trained on when S divides N); None: `timesteps` as given. Either must start at T-1,
            where x is pure noise (sample.py's default leading spacing starts lower: hence the default).
        noise: False re-noises deterministically with the predicted eps (DDIM, eta = 0): PCM's sampling between
            phase edges (use steps = phases).
        times: the times visited, given (over `spacing`): Song et al. 2023 search the intermediate times of
            multistep sampling; len(times) must be the step count (benchmarks/consistency_mixture.py reports them).
    """
    if times is not None:
        if any(isinstance(t, bool) or not isinstance(t, int) for t in times):
            raise ValueError(f"sampler.times={list(times)} must be whole timesteps (T-1 = {schedule.T - 1} first)")
        if len(times) != len(timesteps):
            raise ValueError(f"sampler.times={list(times)} visits {len(times)} times but steps={len(timesteps)}: "
                             f"give one time per step, T-1 = {schedule.T - 1} first")  # fmt: skip
        timesteps, spacing = torch.as_tensor(list(times), dtype=torch.int64), None
    if spacing is not None:
        timesteps = samplers_timesteps(spacing, len(timesteps), schedule)
    steps, _ = _steps(schedule, timesteps)
    if steps[0][0] != schedule.T - 1:
        raise ValueError(
            f"consistency sampling starts at t = T-1 = {schedule.T - 1}, where x is pure noise; these timesteps start "
            f"at {steps[0][0]}: use sampler.spacing=trailing (the default) or timesteps starting at T-1"
        )
    for t, s, abar_t, abar_s in steps:
        eps = model(x, _at(x, t))
        if not noise:  # DDIM eta = 0, the shared step
            x = samplers._ddim_step(x, eps, abar_t, abar_s, clip=clip)
            continue
        x0 = _predict_x0(x, eps, abar_t, clip)
        x = x0 if s < 0 else _to(x0, randn_like(x, generator), abar_s)
    return x


def samplers_timesteps(spacing: str, steps: int, schedule: Schedule) -> Tensor:
    """timesteps.make with a sampler option's error message."""
    try:
        return timesteps.make(spacing, steps, schedule)
    except ValueError as error:
        raise ValueError(f"sampler.spacing={spacing!r}: {error}") from None
