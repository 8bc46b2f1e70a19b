"""The pieces every sampler shares: the step list, the model's time input, x0 from eps, DDIM's update, the noise
source. Sampler modules import this one only, never each other (tests/test_imports.py).

    sampler(model, x, schedule, timesteps, *, generator=None, **options) -> x0

`model(x, t) -> eps` with t int64 [B] (float64 between the integers where the ODE solvers fon and pf evaluate:
`between`); `x` is the starting noise x_T [B, C, H, W]; `timesteps` is a strictly descending int64 tensor in
[0, T-1] (diffusion.timesteps). Each step goes from t to s, the next timestep (s = -1
after the last: clean data, alpha_bar = 1); the model is never called at s = -1. `clip` clamps every clean
estimate x0 to [-1, 1] (images only: it biases unbounded data). Stochastic samplers draw their noise with
`randn_like` from `generator`: a torch.Generator, or any object with `randn(shape, *, device, dtype)` (such as
diffusion.sampling.generate.RowGenerators: one stream per image). Coefficients are Python floats taken from the
float64 schedule once per call, so a step costs its tensor ops and nothing else.

Notation (code -> papers):
    abar_t, abar_s   alpha_bar at t and s; alpha_t in DDIM (Song et al. 2021) and PNDM (Liu et al. 2022)
    eps              eps_theta(x_t, t), the model's noise prediction
    x0               f_theta(x_t) = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)      (DDIM eq. 9)
    eta, sigma       sigma_t(eta), DDIM eq. 16; eta = 1 is DDPM's posterior std beta-tilde (Ho et al. eq. 7)
    ddim_step        DDIM eq. 12; at eta = 0 also PNDM's transfer phi(x_t, eps, t, s) (Liu et al. eq. 9)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..schedule import Schedule, eps_from_x0, half_log_snr, x0_from_eps
from ..timesteps import check_start

__all__ = ["Model", "NoiseSource", "Generator", "Step", "steps", "t_batch", "denoise", "predict_x0", "ddim_step",
           "randn_like", "half_log_snr", "between", "refuse_pure_noise_start"]  # fmt: skip

Model = Callable[[Tensor, Tensor], Tensor]
Step = tuple[int, int, float, float]  # (t, s, abar_t, abar_s)


class NoiseSource(Protocol):
    """Draws standard normal noise of a given shape; e.g. one generator per image (diffusion.sampling.generate)."""

    def randn(self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> Tensor: ...


Generator = torch.Generator | NoiseSource | None


def steps(schedule: Schedule, timesteps: Tensor | Sequence[int]) -> tuple[list[Step], list[float]]:
    """(t, s, abar_t, abar_s) for each step, and alpha_bar as a list where index -1 gives 1.0 (clean data); the
    timesteps are checked (1-D, integers, strictly descending, in range, starting from pure noise)."""
    ts = torch.as_tensor(timesteps)
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(
            f"timesteps must be a non-empty 1-D tensor (at least one step), got shape {tuple(ts.shape)}: "
            "build one with diffusion.timesteps, e.g. timesteps.leading(50, schedule.T)"
        )
    if ts.is_floating_point() or ts.is_complex() or ts.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers (int64), got dtype {ts.dtype}")
    ts = ts.tolist()  # one host transfer per call, not one per step
    if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(
            f"timesteps must be strictly descending (noisiest first), got {ts[:10]}{'...' * (len(ts) > 10)}"
        )
    if ts[0] > schedule.T - 1 or ts[-1] < 0:
        raise ValueError(
            f"timesteps must lie in [0, T-1] = [0, {schedule.T - 1}] for {schedule}, got {ts[-1]}..{ts[0]}"
        )
    check_start(ts, schedule)  # the first step must be pure noise, as x_T is
    abar = schedule.alphas_cumprod.tolist() + [1.0]
    return [(t, s, abar[t], abar[s]) for t, s in zip(ts, ts[1:] + [-1], strict=True)], abar


def t_batch(x: Tensor, t: int) -> Tensor:
    """The model's time input: t for every image of x, int64 [B]."""
    return torch.full((len(x),), t, dtype=torch.int64, device=x.device)


def denoise(model: Model, x: Tensor, t: Tensor, abar_t: float | Tensor, clip: bool = False) -> tuple[Tensor, Tensor]:
    """(eps, x0) of `model` at x_t = x, t int64 [B]: through the model's own `predict` where it has one (a network
    that predicts x0 or v: diffusion.wrappers.prediction, exact also at alpha_bar = 0), else x0 from its eps. With
    `clip`, x0 is clamped to [-1, 1] and eps made consistent with it. What a network predicts stays the wrapper's."""
    predict = getattr(model, "predict", None)
    if predict is not None:
        eps, x0 = predict(x, t)
    else:
        eps = model(x, t)
        x0 = x0_from_eps(x, eps, abar_t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x, x0, abar_t)
    return eps, x0


def predict_x0(x: Tensor, eps: Tensor, abar_t: float | Tensor, clip: bool = False) -> Tensor:
    """x0 = f_theta(x_t) (DDIM eq. 9), clamped to [-1, 1] if `clip`."""
    x0 = x0_from_eps(x, eps, abar_t)
    return x0.clamp(-1, 1) if clip else x0


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like x from `generator` (drawn on the generator's own device, then moved)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return generator.randn(x.shape, device=x.device, dtype=x.dtype)


def ddim_step(
    x: Tensor,
    eps: Tensor,
    abar_t: float,
    abar_s: float,
    *,
    eta: float = 0.0,
    std: float | None = None,
    clip: bool = False,
    generator: Generator = None,
    x0: Tensor | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_s (Song et al. eq. 12), shared by DDIM, DDPM, PNDM's transfer, Analytic-DPM and
    consistency sampling.

    `std` replaces sigma(eta) as the std of the fresh noise while the mean keeps sigma(eta): DDPM's "beta"
    variance is the eta = 1 mean (the posterior mean) with noise of std sqrt(beta); Analytic-DPM's is its optimal
    std. `x0`: the model's own clean estimate (`denoise`), needed where alpha_bar_t = 0 (eq. 9 divides by it).
    """
    # 1. the clean estimate x0 (eq. 9, unless given); after clipping, eps is made consistent with it
    x0 = predict_x0(x, eps, abar_t) if x0 is None else x0
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x, x0, abar_t)
    # 2. the noise level sigma(eta) of eq. 16: eta = 1 is the posterior std between t and s (Ho et al. eq. 7)
    sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) ** 0.5
    # 3. x_s = sqrt(abar_s) x0 + the direction pointing to x_t + fresh noise
    x = abar_s**0.5 * x0 + max(1 - abar_s - sigma**2, 0.0) ** 0.5 * eps
    std = sigma if std is None else std
    if std > 0:
        x = x + std * randn_like(x, generator)
    return x


def between(schedule: Schedule, lam: float, x: Tensor) -> tuple[Tensor, float]:
    """(the model's time input [B], alpha_bar) at the half log-SNR `lam` = log(alpha / sigma): a float timestep
    between the schedule's integers (Schedule.time_of), where the ODE solvers (fon, pf) evaluate the model."""
    t = schedule.time_of(torch.tensor([lam], dtype=torch.float64, device=x.device))
    return t.expand(len(x)), 1 / (1 + math.exp(-2 * lam))


def refuse_pure_noise_start(trajectory: Sequence[Step], why: str) -> None:
    """ValueError where the first timestep is pure noise (alpha_bar = 0: zero terminal SNR), which a sampler that
    steps in x / alpha, sigma / alpha or lambda cannot start from; `why` says what breaks there."""
    if trajectory[0][2] == 0:
        raise ValueError(f"{why} at this start (a zero-terminal-SNR schedule): use sampler=ddim, ddpm, dpm_solver or "
                         "unipc, which take the model's x0 there")  # fmt: skip
