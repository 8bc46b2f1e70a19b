"""Samplers: the paper algorithms as plain functions with one signature.

    sampler(model, x, schedule, timesteps, *, generator=None, **options) -> x0

`model(x, t) -> eps` with t int64 [B]; `x` is the starting noise x_T [B, C, H, W]; `timesteps` is a strictly
descending int64 tensor in [0, T-1] (see diffusion.timesteps). Each step goes from t to s, the next timestep
(s = -1 after the last: clean data, alpha_bar = 1). The model is never called at s = -1. `clip` clamps every
clean estimate x0 to [-1, 1] (images only: it biases unbounded data); each sampler's default is its paper's code's
(DDPM's clips; DDIM's, PNDM's, DPM-Solver++'s and UniPC's do not). Stochastic samplers draw their noise with
`randn_like` from `generator`: a torch.Generator, or any object with `randn(shape, *, device, dtype)` (such as
diffusion.generation.RowGenerators: one stream per image). Coefficients are Python floats taken from
the float64 schedule once per call, so a step costs its tensor ops and nothing else.

Notation (code -> papers):
    abar_t, abar_s   alpha_bar at t and s; alpha_t in DDIM (Song et al. 2021) and PNDM (Liu et al. 2022)
    eps              eps_theta(x_t, t), the model's noise prediction
    x0               f_theta(x_t) = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)      (DDIM eq. 9)
    eta, sigma       sigma_t(eta), DDIM eq. 16; eta = 1 is DDPM's posterior std beta-tilde (Ho et al. eq. 7)
    _ddim_step       DDIM eq. 12; at eta = 0 also PNDM's transfer phi(x_t, eps, t, s) (Liu et al. eq. 9)
    history          PNDM's eps of the last steps, newest last

Here: ddpm, ddim, pndm, s_pndm, plms. In diffusion.solvers (re-exported here): the log-SNR ODE solvers dpm_solver
(DPM-Solver++(2M)), dpm_solver_3m and unipc, which take `_steps`, `_at` and `_predict_x0` from this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .schedule import Schedule
from .timesteps import check_start

Model = Callable[[Tensor, Tensor], Tensor]


class NoiseSource(Protocol):
    """Draws standard normal noise of a given shape; e.g. one generator per image (diffusion.generation)."""

    def randn(self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> Tensor: ...


Generator = torch.Generator | NoiseSource | None

__all__ = [
    "ddpm",
    "ddim",
    "pndm",
    "s_pndm",
    "plms",
    "randn_like",
    "Model",
    "NoiseSource",
]  # + the solvers (__getattr__)

# Adams-Bashforth weights of order 1..4, newest eps first (PNDM's pseudo linear multistep uses order 4).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


# -------------------------------------------------------------------- shared pieces
def _steps(schedule: Schedule, timesteps: Tensor | Sequence[int]) -> tuple[list[tuple[int, int, float, float]], list]:
    """(t, s, abar_t, abar_s) for each step, and alpha_bar as a list where index -1 gives 1.0 (clean data)."""
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


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like x from `generator` (drawn on the generator's own device, then moved)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return generator.randn(x.shape, device=x.device, dtype=x.dtype)


def _at(x: Tensor, t: int) -> Tensor:
    """The model's time input: t for every image, int64 [B]."""
    return torch.full((len(x),), t, dtype=torch.int64, device=x.device)


def _predict_x0(x: Tensor, eps: Tensor, abar_t: float, clip: bool) -> Tensor:
    """x0 = f_theta(x_t) (DDIM eq. 9), clamped to [-1, 1] if `clip`."""
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    return x0.clamp(-1, 1) if clip else x0


def _ddim_step(
    x: Tensor,
    eps: Tensor,
    abar_t: float,
    abar_s: float,
    *,
    eta: float = 0.0,
    std: float | None = None,
    clip: bool = False,
    generator: Generator = None,
) -> Tensor:
    """One DDIM update x_t -> x_s (Song et al. eq. 12), shared by DDIM, DDPM and PNDM's transfer.

    `std` replaces sigma(eta) as the std of the fresh noise while the mean keeps sigma(eta): DDPM's "beta"
    variance is the eta = 1 mean (the posterior mean) with noise of std sqrt(beta).
    """
    # 1. the clean estimate x0 (eq. 9); after clipping, eps is made consistent with it
    x0 = _predict_x0(x, eps, abar_t, clip)
    if clip:
        eps = (x - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
    # 2. the noise level sigma(eta) of eq. 16: eta = 1 is the posterior std between t and s (Ho et al. eq. 7)
    sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) ** 0.5
    # 3. x_s = sqrt(abar_s) x0 + the direction pointing to x_t + fresh noise
    x = abar_s**0.5 * x0 + max(1 - abar_s - sigma**2, 0.0) ** 0.5 * eps
    std = sigma if std is None else std
    if std > 0:
        x = x + std * randn_like(x, generator)
    return x


# -------------------------------------------------------------------- DDPM and DDIM
@torch.no_grad()
def ddpm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    variance: str = "posterior",
    clip: bool = True,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2); on a shorter `timesteps`, the respaced process of
    Nichol & Dhariwal 2021 (sec. 4: betas 1 - abar_t / abar_s between the visited steps). NFE = S.

    Args:
        variance: "posterior" (beta-tilde, Ho et al. eq. 7; the same as DDIM with eta = 1) or "beta" (sigma^2 =
            beta). The last step adds no noise, as in Algorithm 2.
        clip: on by default, as in Ho et al.'s code (p_sample's clip_denoised); the other samplers' papers do not.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' (beta-tilde) or 'beta', got {variance!r}")
    steps, _ = _steps(schedule, timesteps)
    for t, s, abar_t, abar_s in steps:
        std = (1 - abar_t / abar_s) ** 0.5 if variance == "beta" and s >= 0 else None
        eps = model(x, _at(x, t))
        x = _ddim_step(x, eps, abar_t, abar_s, eta=1.0, std=std, clip=clip, generator=generator)
    return x


@torch.no_grad()
def ddim(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    eta: float = 0.0,
    clip: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM (posterior variance) at eta = 1. NFE = S."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    steps, _ = _steps(schedule, timesteps)
    for t, _, abar_t, abar_s in steps:
        eps = model(x, _at(x, t))
        x = _ddim_step(x, eps, abar_t, abar_s, eta=eta, clip=clip, generator=generator)
    return x


# -------------------------------------------------------------------- PNDM (Liu et al. 2022)
def _pndm(
    model: Model, x: Tensor, schedule: Schedule, timesteps: Tensor, *, warmup: str, order: int, clip: bool
) -> Tensor:
    """Pseudo linear multistep of up to `order`, after `warmup` steps of pseudo Runge-Kutta ("rk", three steps)
    or pseudo improved Euler ("heun", one step). Every update is the transfer phi = DDIM's eta = 0 step.

    The transfer reads alpha_bar at the visited timestep t itself, the same index the model was called with
    (the official code reads alphas_cump[t + 1], the next timestep's). The model is never called at clean data,
    so the final step is always a multistep one (of the order its history allows), even within the warm-up.
    """
    steps, abar = _steps(schedule, timesteps)
    n_warmup = 3 if warmup == "rk" else 1
    history: list[Tensor] = []
    for i, (t, s, abar_t, abar_s) in enumerate(steps):
        eps = model(x, _at(x, t))
        history = [*history[-3:], eps]
        warming_up = i < n_warmup and s >= 0
        if warming_up and warmup == "rk":
            # pseudo Runge-Kutta: the midpoint t - delta/2 rounded down to an integer m (s <= m < t), whose own
            # alpha_bar the transfers use, so each stage lands exactly on the noise level the model is told
            m = (t + s) // 2
            x1 = _ddim_step(x, eps, abar_t, abar[m], clip=clip)
            e2 = model(x1, _at(x, m))
            x2 = _ddim_step(x, e2, abar_t, abar[m], clip=clip)
            e3 = model(x2, _at(x, m))
            x3 = _ddim_step(x, e3, abar_t, abar_s, clip=clip)
            e4 = model(x3, _at(x, s))
            eps = (eps + 2 * e2 + 2 * e3 + e4) / 6
        elif warming_up:
            # pseudo improved Euler: average the slopes at t and at the Euler (DDIM) prediction of x_s
            e2 = model(_ddim_step(x, eps, abar_t, abar_s, clip=clip), _at(x, s))
            eps = (eps + e2) / 2
        else:
            # pseudo linear multistep: Adams-Bashforth on the eps history, newest first
            weights = _ADAMS_BASHFORTH[min(order, len(history))]
            eps = eps * weights[0]
            for w, e in zip(weights[1:], reversed(history[:-1]), strict=False):
                eps.add_(e, alpha=w)
        x = _ddim_step(x, eps, abar_t, abar_s, clip=clip)
    return x


@torch.no_grad()
def pndm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """F-PNDM (Liu et al. 2022): three pseudo Runge-Kutta steps (4 model calls each), then the 4th-order pseudo
    linear multistep. NFE = S + 9 for S >= 4 steps (4S - 3 for S <= 3: the final step is never Runge-Kutta).

    Runge-Kutta midpoints t - delta/2 are rounded down to integers, and alpha_bar is read at the visited timestep
    itself (not one index later, as the official code does). The pseudo methods combine eps from several points,
    and the transfer from t multiplies an error in that combination by about sqrt(abar_s / abar_t): from a
    timestep whose alpha_bar is tiny (the cosine schedule's t = T-1: 2e-9) they go wrong (`clip` only bounds the
    damage). Start below it, as the paper does (`leading` spacing), or use `dpm_solver`, which combines x0 instead.
    """
    return _pndm(model, x, schedule, timesteps, warmup="rk", order=4, clip=clip)


@torch.no_grad()
def s_pndm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """S-PNDM (Liu et al. 2022): one pseudo improved Euler step (2 calls), then the 2nd-order pseudo linear
    multistep. NFE = S + 1 (1 for S = 1). The notes of `pndm` apply."""
    return _pndm(model, x, schedule, timesteps, warmup="heun", order=2, clip=clip)


@torch.no_grad()
def plms(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    timesteps: Tensor,
    *,
    generator: Generator = None,
    clip: bool = False,
) -> Tensor:
    """PLMS as in Stable Diffusion: one pseudo improved Euler step, then pseudo linear multistep of order 2, 3,
    then 4 as the history grows (Liu et al. 2022 without the Runge-Kutta start). NFE = S + 1 (1 for S = 1).
    The notes of `pndm` apply."""
    return _pndm(model, x, schedule, timesteps, warmup="heun", order=4, clip=clip)


# -------------------------------------------------------------------- the log-SNR ODE solvers
_SOLVERS = ("dpm_solver", "dpm_solver_3m", "unipc")


def __getattr__(name: str):
    """diffusion.samplers.dpm_solver (conf/sampler/dpm_solver.yaml's _target_), dpm_solver_3m and unipc live in
    diffusion.solvers, which imports this module's shared pieces: looked up on first use, so either module can be
    imported first without a circular import."""
    if name in _SOLVERS:
        from . import solvers

        return getattr(solvers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
