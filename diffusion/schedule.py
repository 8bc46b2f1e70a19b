"""Noise schedules and the forward process of DDPM (Ho et al. 2020).

Notation (code -> paper):
    betas[t]           beta_t                          noise added at step t (t = 0 .. T-1)
    alphas_cumprod[t]  alpha_bar_t = prod_{i<=t} (1 - beta_i)
    x_at, q_sample     x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps    (Ho et al. eq. 4)
    x0_from_eps        x0  = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDIM eq. 9)
    eps_from_x0        eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)
    half_log_snr       lambda_t = log(alpha_t / sigma_t) = log(alpha_bar_t / (1 - alpha_bar_t)) / 2   (DPM-Solver)
    posterior          q(x_s | x_t, x0) for any s < t (eq. 6-7; s = t-1 is DDPM's, s < t-1 is a respaced step)

The conversions take alpha_bar as a float or as a tensor that broadcasts against x: every sampler, loss and wrapper
uses these, so each formula is written once.

Timesteps are 0-based as in the official code: t = 0 is the first noising step and t = -1 stands for clean
data (alpha_bar = 1), which is where every sampler's last step lands. Coefficients are float64 and are cast to
the data's dtype at use, so bf16 training never rounds the schedule itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Schedule", "linear", "cosine", "quadratic", "sigmoid", "SCHEDULES", "extract", "x_at", "x0_from_eps",
           "eps_from_x0", "half_log_snr"]  # fmt: skip


def extract(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped [B, 1, 1, 1] to broadcast against `like` ([B, C, H, W]), in `like`'s dtype."""
    out = values.to(like.device)[t.to(like.device)]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


Level = float | Tensor  # alpha_bar: a number, or a tensor that broadcasts against x ([B, 1, 1, 1])


def x_at(x0: Tensor, eps: Tensor, abar: Level) -> Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: q(x_t | x0) with the given noise (Ho et al. eq. 4), and DDIM's
    eta = 0 update (eq. 12) with the predicted eps."""
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * eps


def x0_from_eps(x: Tensor, eps: Tensor, abar: Level) -> Tensor:
    """The x0 that x_t = x and noise eps imply (DDIM eq. 9, f_theta)."""
    return (x - (1 - abar) ** 0.5 * eps) / abar**0.5


def eps_from_x0(x: Tensor, x0: Tensor, abar: Level) -> Tensor:
    """The eps that x_t = x and a clean estimate x0 imply (used after clipping x0)."""
    return (x - abar**0.5 * x0) / (1 - abar) ** 0.5


def half_log_snr(abar: Level) -> Level:
    """lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2, accurate where abar is near 0 or 1; a float for a
    float (the samplers' per-step coefficients), a tensor for a tensor."""
    if isinstance(abar, Tensor):
        return 0.5 * (abar.log() - (-abar).log1p())
    return 0.5 * (math.log(abar) - math.log1p(-abar))


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete variance schedule: `T` steps, `betas` and `alphas_cumprod` as float64 tensors [T]."""

    betas: Tensor = field(repr=False)
    name: str = "custom"
    alphas_cumprod: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    def __repr__(self) -> str:
        return f"Schedule({self.name}, T={self.T})"

    @property
    def T(self) -> int:
        return len(self.betas)

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with its tensors on `device` (still float64), for gathers inside a training step."""
        return Schedule(self.betas.to(device), self.name)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar_t for int64 t [B] (t = -1 gives 1: clean data), float64."""
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded.to(t.device)[t + 1]

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x0) with the given noise (Ho et al. eq. 4); x0, noise [B, C, H, W], t [B]."""
        return x_at(x0, noise, extract(self.alphas_cumprod, t, x0))

    def predict_x0(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample: the x0 that x_t = x and noise eps imply (t [B])."""
        return x0_from_eps(x, eps, extract(self.alphas_cumprod, t, x))

    def predict_eps(self, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The eps that x_t = x and a clean estimate x0 imply (t [B])."""
        return eps_from_x0(x, x0, extract(self.alphas_cumprod, t, x))

    def posterior(self, x0: Tensor, x: Tensor, t: Tensor, s: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_s | x_t = x, x0) for s < t (default s = t - 1; s = -1 means clean data).

        With s = t - 1 these are Ho et al. eq. 7 (mean and beta-tilde); for s < t - 1 they are the same formulas
        with the respaced beta' = 1 - alpha_bar_t / alpha_bar_s (Nichol & Dhariwal 2021, section 4).
        """
        s = t - 1 if s is None else s
        abar_t = self.alpha_bar(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        abar_s = self.alpha_bar(s).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        beta = 1 - abar_t / abar_s
        mean = (abar_s.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_s) * x) / (1 - abar_t)
        variance = beta * (1 - abar_s) / (1 - abar_t)
        return mean, variance


# -------------------------------------------------------------------- the schedules
def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 (given for T = 1000; scaled values are the user's call)."""
    _check_T(T)
    return Schedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999."""
    _check_T(T)

    def f(i: Tensor) -> Tensor:
        return torch.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2

    i = torch.arange(T + 1, dtype=torch.float64)
    abar = f(i) / f(torch.zeros((), dtype=torch.float64))
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return Schedule(betas, "cosine")


def quadratic(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The DDIM code's "quad" schedule: sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end)."""
    _check_T(T)
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64)
    return Schedule(root**2, "quadratic")


def sigmoid(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Betas on a sigmoid over [-6, 6] between beta_start and beta_end (GeoDiff, Xu et al. 2022)."""
    _check_T(T)
    ramp = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    return Schedule(ramp * (beta_end - beta_start) + beta_start, "sigmoid")


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": linear,
    "cosine": cosine,
    "quadratic": quadratic,
    "sigmoid": sigmoid,
}


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"the number of diffusion steps T must be an integer >= 2, got {T!r}")
