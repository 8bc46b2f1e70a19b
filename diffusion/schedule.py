"""Noise schedules and the forward process of DDPM (Ho et al. 2020).

Notation (code -> paper):
    betas[t]           beta_t                          noise added at step t (t = 0 .. T-1)
    alphas_cumprod[t]  alpha_bar_t = prod_{i<=t} (1 - beta_i)
    x_at, q_sample     x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps    (Ho et al. eq. 4)
    x0_from_eps        x0  = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDIM eq. 9)
    eps_from_x0        eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)
    half_log_snr       lambda_t = log(alpha_t / sigma_t) = log(alpha_bar_t / (1 - alpha_bar_t)) / 2   (DPM-Solver)
    v                  v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022), alpha = sqrt(alpha_bar), sigma = sqrt(1 - ...)
    eps_of, x0_of      a network's output for a prediction target (eps, x0 or v) -> eps and x0:
                         eps: x0 as above;  x0: eps as above;  v: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
    rescale_zero_terminal_snr  Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) shifted to 0 at T-1, rescaled to keep t = 0
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
           "eps_from_x0", "half_log_snr", "PREDICTIONS", "target", "eps_of", "x0_of",
           "rescale_zero_terminal_snr"]  # fmt: skip

PREDICTIONS = ("eps", "x0", "v")  # what a network may predict: the noise, the clean image, or v (Salimans & Ho 2022)


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
    float (the samplers' per-step coefficients), a tensor for a tensor; -inf at abar = 0 (zero terminal SNR)."""
    if isinstance(abar, Tensor):
        return 0.5 * (abar.log() - (-abar).log1p())
    return -math.inf if abar == 0 else 0.5 * (math.log(abar) - math.log1p(-abar))


# -------------------------------------------------------------------- prediction targets
def target(prediction: str, x0: Tensor, eps: Tensor, abar: Level) -> Tensor:
    """What a network predicting `prediction` is trained to output for x_t = x_at(x0, eps, abar)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return abar**0.5 * eps - (1 - abar) ** 0.5 * x0
    raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")


def eps_of(prediction: str, out: Tensor, x: Tensor, abar: Level) -> Tensor:
    """The eps that a network's output `out` for `prediction` implies at x_t = x (exact for v at every abar)."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return eps_from_x0(x, out, abar)
    if prediction == "v":
        return (1 - abar) ** 0.5 * x + abar**0.5 * out
    raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")


def x0_of(prediction: str, out: Tensor, x: Tensor, abar: Level) -> Tensor:
    """The x0 that a network's output `out` for `prediction` implies at x_t = x: for v also at abar = 0 (x0 = -v),
    where an eps-prediction says nothing about x0 (0 / 0)."""
    if prediction == "eps":
        return x0_from_eps(x, out, abar)
    if prediction == "x0":
        return out
    if prediction == "v":
        return abar**0.5 * x - (1 - abar) ** 0.5 * out
    raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024 (Algorithm 1): betas whose alpha_bar is exactly 0 at T-1 (pure noise, as sampling assumes),
    sqrt(alpha_bar) shifted down by its last value and scaled to keep its first; the last beta becomes 1."""
    root = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


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
        if not bool(((betas > 0) & (betas < 1)).all()) and not (bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all())
                                                               and float(betas[-1]) == 1.0):  # fmt: skip
            raise ValueError("every beta must lie in (0, 1), but the last, which is 1 under zero terminal SNR")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    def __repr__(self) -> str:
        return f"Schedule({self.name}, T={self.T})"

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def zero_terminal(self) -> bool:
        """alpha_bar is exactly 0 at T-1 (Lin et al. 2024): x_{T-1} holds no signal, eps-prediction is undefined."""
        return float(self.alphas_cumprod[-1]) == 0.0

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with its tensors on `device` (still float64), for gathers inside a training step."""
        return Schedule(self.betas.to(device), self.name)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar_t for int64 t [B] (t = -1 gives 1: clean data), float64. A float t in [0, T-1] (the ODE
        solvers' intermediate times) is interpolated linearly in lambda, the half log-SNR, between its integers, so
        that alpha_bar = sigmoid(2 lambda) is smooth in lambda whatever the schedule."""
        if t.is_floating_point():
            return self._alpha_bar_between(t)
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded.to(t.device)[t + 1]

    def _alpha_bar_between(self, t: Tensor) -> Tensor:
        lam = half_log_snr(self.alphas_cumprod.to(t.device))
        t = t.double().clamp(0, self.T - 1)
        low = t.floor().long().clamp(max=self.T - 2)
        w = t - low
        between = torch.where(w > 0, (1 - w) * lam[low] + w * lam[low + 1], lam[low])  # -inf * 0 is no number
        return torch.sigmoid(2 * between)

    def time_of(self, lam: Tensor) -> Tensor:
        """The continuous timestep [B] whose lambda (as alpha_bar interpolates it) is `lam`: the inverse of the map
        above, for the ODE solvers that step in lambda (float64)."""
        table = half_log_snr(self.alphas_cumprod.to(lam.device))  # decreasing in t
        i = torch.searchsorted(-table, -lam.double()).clamp(1, self.T - 1)  # table[i - 1] >= lam > table[i]
        w = (table[i - 1] - lam) / (table[i - 1] - table[i])
        return (i - 1).double() + w.clamp(0, 1)

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
def linear(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False
) -> Schedule:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 (given for T = 1000; scaled values are the user's call)."""
    _check_T(T)
    return _made(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear", zero_terminal_snr)


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False) -> Schedule:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999."""
    _check_T(T)

    def f(i: Tensor) -> Tensor:
        return torch.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2

    i = torch.arange(T + 1, dtype=torch.float64)
    abar = f(i) / f(torch.zeros((), dtype=torch.float64))
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return _made(betas, "cosine", zero_terminal_snr)


def quadratic(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
              zero_terminal_snr: bool = False) -> Schedule:  # fmt: skip
    """The DDIM code's "quad" schedule: sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end)."""
    _check_T(T)
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64)
    return _made(root**2, "quadratic", zero_terminal_snr)


def sigmoid(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
            zero_terminal_snr: bool = False) -> Schedule:  # fmt: skip
    """Betas on a sigmoid over [-6, 6] between beta_start and beta_end (GeoDiff, Xu et al. 2022)."""
    _check_T(T)
    ramp = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    return _made(ramp * (beta_end - beta_start) + beta_start, "sigmoid", zero_terminal_snr)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": linear,
    "cosine": cosine,
    "quadratic": quadratic,
    "sigmoid": sigmoid,
}


def _made(betas: Tensor, name: str, zero_terminal: bool) -> Schedule:
    """The schedule of `betas`, rescaled to zero terminal SNR if asked (its name says so)."""
    if not isinstance(zero_terminal, bool):
        raise ValueError(f"zero_terminal_snr must be true or false, got {zero_terminal!r}")
    return (
        Schedule(rescale_zero_terminal_snr(betas), f"{name}, zero terminal SNR")
        if zero_terminal
        else Schedule(betas, name)
    )


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"the number of diffusion steps T must be an integer >= 2, got {T!r}")
