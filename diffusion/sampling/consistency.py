"""Consistency models on our discrete-time VP schedules: the consistency function, its eps-model, multistep sampling.

A consistency function f(x_t, t) maps every point of a probability-flow ODE trajectory to the trajectory's end
(Song et al. 2023). As in Latent Consistency Models (Luo et al. 2023), it is built around an eps-network:

    f(x, t) = c_skip(t) x + c_out(t) x_e(x, t),   x_e = the DDIM (eta = 0) step of the network from t to the edge e

with e = -1 (clean data: x_e is the network's x0) for CD and CT, and the phase edge below t for PCM (Wang et al.
2024), so M = 1 PCM is CD by construction. c_skip(e) = 1 and c_out(e) = 0 exactly, and f(x, e) = x exactly.
`ConsistencyModel` turns f back into an eps-model (the eps whose DDIM step from t to e lands on f), so
`consistency_sampling` is an ordinary sampler of the sampler contract. The losses that train f (CD, CT, PCM) are in
diffusion.training.losses.

Notation (code -> papers):
    grid          t_0 = -1 < t_1 < ... < t_N = T-1, boundary t_0 (Song et al.'s epsilon: clean data): `karras`
                  (Song et al. 2023: rho = 7 in the VE noise level, dense near the data) or `grid`, uniform
                  t_n = round(n T / N) - 1 (timesteps.trailing; LCM's skipping step T / N)
    edges         PCM's phase edges s_0 = -1 < s_1 < ... < s_{M-1}: s_j = round(j T / M) - 1
    abar, alpha, sigma   alpha_bar_t, sqrt(abar), sqrt(1 - abar); sigma / alpha is the VE noise level of x_t / alpha
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import timesteps
from ..schedule import Schedule, half_log_snr, x_at
from .core import Generator, Model, ddim_step, denoise, randn_like, steps, t_batch

__all__ = ["SIGMA_DATA", "TIME_SCALE", "boundary", "grid", "karras", "GRIDS", "make_grid", "phase_edges",
           "edge_below", "column", "log_ve", "ddim_to", "consistency", "ConsistencyModel",
           "consistency_sampling"]  # fmt: skip

SIGMA_DATA = 0.5  # sigma_data of the boundary coefficients (Song et al. 2023, app. C; LCM)
TIME_SCALE = 10.0  # LCM's timestep_scaling: c_out reaches 0.999 one timestep above the edge


# -------------------------------------------------------------------- the parameterization
def column(v: Tensor, like: Tensor) -> Tensor:
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


def log_ve(abar: Tensor) -> Tensor:
    """log s, s = sigma / alpha = sqrt((1 - abar) / abar) the VE noise level: -lambda, DPM-Solver's half log-SNR
    (schedule.half_log_snr); -inf at clean data (abar = 1)."""
    return -half_log_snr(abar)


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
    log_s = log_ve(abar).numpy()  # increasing in t
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


def ddim_to(model: Model, schedule: Schedule, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DDIM (eta = 0) step of model(x, t) -> eps from t to s, per sample (t, s int64 [B]; s = -1: its x0): x_e of
    the consistency function, and CD's first-order teacher step."""
    eps, x0 = denoise(model, x, t, column(schedule.alpha_bar(t), x))
    return x_at(x0, eps, column(schedule.alpha_bar(s), x))


def consistency(net: Model, schedule: Schedule, x: Tensor, t: Tensor, edge: Tensor | int = -1) -> Tensor:
    """f(x, t) = c_skip x + c_out x_e, x_e = net's DDIM step from t to `edge` (-1: its x0); exactly x at t = edge.

    Where t = edge the network is not used (its output there, possibly non-finite, is discarded)."""
    edge = torch.as_tensor(edge, device=t.device).expand_as(t)
    at_edge = t == edge
    x_e = ddim_to(net, schedule, x, torch.where(at_edge, edge + 1, t), edge)  # any t > edge: discarded at the edge
    c_skip, c_out = boundary(t, edge)
    return torch.where(column(at_edge, x).bool(), x, column(c_skip, x) * x + column(c_out, x) * x_e)


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
        a_t, a_e = column(self.schedule.alpha_bar(t), x) ** 0.5, column(self.schedule.alpha_bar(edge), x) ** 0.5
        s_t, s_e = (1 - a_t**2) ** 0.5, (1 - a_e**2) ** 0.5
        # DDIM: x_e = (a_e / a_t) x + (s_e - a_e s_t / a_t) eps, solved for eps (s / a grows with t: no zero)
        return (f - a_e / a_t * x) / (s_e - a_e * s_t / a_t)


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
    trajectory, _ = steps(schedule, timesteps)
    if trajectory[0][0] != schedule.T - 1:
        raise ValueError(
            f"consistency sampling starts at t = T-1 = {schedule.T - 1}, where x is pure noise; these timesteps start "
            f"at {trajectory[0][0]}: use sampler.spacing=trailing (the default) or timesteps starting at T-1"
        )
    for t, s, abar_t, abar_s in trajectory:
        eps, x0 = denoise(model, x, t_batch(x, t), abar_t, clip)
        if not noise:  # DDIM eta = 0, the shared step
            x = ddim_step(x, eps, abar_t, abar_s, x0=x0)
            continue
        x = x0 if s < 0 else x_at(x0, randn_like(x, generator), abar_s)
    return x


def samplers_timesteps(spacing: str, steps: int, schedule: Schedule) -> Tensor:
    """timesteps.make with a sampler option's error message."""
    try:
        return timesteps.make(spacing, steps, schedule)
    except ValueError as error:
        raise ValueError(f"sampler.spacing={spacing!r}: {error}") from None
