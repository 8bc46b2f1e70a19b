"""Timestep sequences for few-step sampling: descending int64 tensors of S steps drawn from 0 .. T-1.

Fewer steps is a shorter sequence, not a new process: every sampler walks the given timesteps and lands on clean
data (t = -1) after the last one. `make(name, steps, schedule)` builds any spacing by name; Analytic-DPM's optimal
trajectory, which needs the model's Gamma, is diffusion.sampling.analytic's. The uniform spacings are integer
arithmetic, exact for every S and T (a float stride can yield S+1 steps; `even` keeps the official code's float sum
on purpose). Every sampler starts from x_T ~ N(0, I), so `check_start` refuses a sequence whose first timestep still
holds signal. docs/sampling.md gives the measurements behind each choice made here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError
from .schedule import Schedule, half_log_snr

__all__ = ["leading", "linspace", "even", "trailing", "quadratic", "logsnr", "SPACINGS", "NAMES", "GAMMA_SPACINGS",
           "PAPER_SPACING", "paper_spacing", "make", "check_start", "noisiest_usable", "spread_up", "LAMBDA_MIN",
           "StartWarning"]  # fmt: skip


# -------------------------------------------------------------------- the spacings
def leading(steps: int, T: int) -> Tensor:
    """The DDIM paper's uniform skip tau_i = floor(c i), i = 0 .. S-1, with c = T / S (Song et al. 2021, app. D.2):
    0, k, 2k, ... for k = T / S when S divides T (the DDIM code's range(0, T, k)); first step T - ceil(T / S).

    The DDIM code's integer k = T // S instead stops far below T-1 when T/3 < S < T (S = 400: 798), which sends
    samples to other modes (docs/sampling.md). One step is [T-1]: the formula's [0] would ask for clean data from
    pure noise at t = 0.
    """
    _check(steps, T)
    if steps == 1:
        return torch.tensor([T - 1])
    return _descending(np.arange(steps) * T // steps)


def linspace(steps: int, T: int) -> Tensor:
    """Evenly spaced from 0 to T-1 inclusive: round(i (T-1) / (S-1)), ties to even (PNDM's and many libraries'
    default). One step is [T-1], the end a sampler must start from."""
    _check(steps, T)
    if steps == 1:
        return torch.tensor([T - 1])
    return _descending(_round_div(np.arange(steps) * (T - 1), steps - 1))


def even(steps: int, T: int) -> Tensor:
    """Analytic-DPM's even trajectory (Bao et al. 2022; its code's "linear" steps): 1 + i (T-1) / (S-1) in 1-based
    steps, the stride added up in float64 and rounded ties to even, minus 1: `linspace` but at ties, kept exactly
    so that the paper's tables are reproduced on the paper's own timesteps."""
    _check(steps, T)
    if steps == 1:
        return torch.tensor([T - 1])
    ones = np.cumsum(np.r_[1.0, np.full(steps - 1, (T - 1) / (steps - 1))])  # sequential, as the official loop
    return _descending(np.round(ones).astype(np.int64) - 1)


def trailing(steps: int, T: int) -> Tensor:
    """Evenly spaced ending at T-1: round(j T / S) - 1 for j = S .. 1, ties to even, i.e. T-1, T-1-k, ... for
    k = T / S (starts from the noisiest step; Lin et al. 2024)."""
    _check(steps, T)
    return _descending(_round_div(np.arange(1, steps + 1) * T, steps) - 1)


def quadratic(steps: int, T: int) -> Tensor:
    """The DDIM paper's quadratic spacing floor((i sqrt(0.8 T) / (S-1))^2), denser at low noise (CIFAR-10), first
    step floor(0.8 T) (one step: just that).

    At 50+ steps the floors repeat the smallest timesteps (each repeat a wasted model call in the DDIM code); here a
    repeat is moved up to the next free integer so that every step moves. Made for the linear schedule: its start
    keeps too much signal on the cosine one, where `check_start` refuses it.
    """
    _check(steps, T)
    i = np.arange(steps)
    floors = 4 * T * i**2 // (5 * (steps - 1) ** 2) if steps > 1 else np.array([4 * T // 5])
    return _descending(np.maximum.accumulate(floors - i) + i)  # t_i = max(floor_i, t_{i-1} + 1)


def logsnr(steps: int, schedule: Schedule) -> Tensor:
    """Uniform in lambda_t = log(sqrt(abar_t / (1 - abar_t))) from the noisiest usable timestep towards t = 0
    (DPM-Solver, Lu et al. 2022): the official code's grid of S + 1 points from there to t = 0, whose first S are
    the S model calls. Its last step, first order onto t = 0, is our step onto clean data from the S-th point (they
    differ by sigma_0 times the predicted noise); not S points ending at 0, which wastes the last call (the
    LOGSNR_END note of docs/sampling.md).

    Each lambda is mapped to the nearest integer timestep (linear interpolation of lambda over t, rounded); where
    several round to the same t, they are spread to the nearest free integers. The grid starts at `noisiest_usable`,
    before the cosine schedule's clipped betas send lambda off a cliff; repeats at the top are spread downwards, so
    the grid starts there for every S up to start + 1.
    """
    T = schedule.T
    _check(steps, T)
    if steps == 1:  # no interval to spread in lambda: one step starts where every one-step spacing does, at T-1
        return _descending(np.array([T - 1]))
    start = noisiest_usable(schedule)
    lam = half_log_snr(schedule.alphas_cumprod[: start + 1].cpu()).numpy()  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], steps + 1)[:-1]  # the papers' S + 1 points, less t = 0 (LOGSNR_END)
    ts = np.interp(targets, lam[::-1], np.arange(start, -1, -1, dtype=np.float64)).round().astype(np.int64)
    return _descending(spread_up(ts, max(start, steps - 1)))


# The official DPM-Solver code (and UniPC's) drops a discrete schedule's timesteps whose lambda is below this
# (NoiseScheduleVP.numerical_clip_alpha).
LAMBDA_MIN = -5.1


def noisiest_usable(schedule: Schedule) -> int:
    """The noisiest timestep whose lambda is at least LAMBDA_MIN = -5.1, where the official DPM-Solver code cuts
    discrete schedules: T-1 for the linear schedule, 995 for the cosine one at T = 1000 (docs/sampling.md). Every
    timestep above it has sqrt(abar) < 0.006: the grid skips only pure noise."""
    usable = torch.nonzero(half_log_snr(schedule.alphas_cumprod.double()) >= LAMBDA_MIN)
    return int(usable.max()) if len(usable) else 0


def spread_up(ts: np.ndarray, top: int) -> np.ndarray:
    """Integer timesteps rounded from a grid, made distinct and ascending: each repeat moved up to the next free
    integer, then the top ones back down so that the last is at most `top` (needs len(ts) <= top + 1)."""
    i = np.arange(len(ts))
    return np.minimum(np.maximum.accumulate(np.sort(ts) - i) + i, top - (len(ts) - 1) + i)


# Each sampler's own spacing, its paper's code's (sample.py's spacing=null): sampler function -> (spacing, whose).
PAPER_SPACING = {
    "ddim": ("leading", "the DDIM paper's uniform skip"),
    "ddpm": ("linspace", "improved-diffusion's respacing, round(i (T-1) / (S-1)), which the ddpm sampler follows"),
    "pndm": ("leading", "the PNDM code's uniform skip"),
    "s_pndm": ("leading", "the PNDM code's uniform skip"),
    "plms": ("leading", "the PNDM code's uniform skip"),
    "dpm_solver": ("logsnr", "the DPM-Solver code's logSNR grid"),
    "dpm_solver_3m": ("logsnr", "the DPM-Solver code's logSNR grid"),
    "unipc": ("logsnr", "the UniPC code's logSNR grid (built on DPM-Solver's)"),
    "analytic_ddpm": ("even", "the Analytic-DPM code's even trajectory"),
    "analytic_ddim": ("even", "the Analytic-DPM code's even trajectory"),
    "fon": ("leading", "the PNDM code's uniform skip"),
    "pf": ("trailing", "from T-1; the adaptive solver chooses the rest"),
    "consistency_sampling": ("trailing", "T-1 first, the consistency grid's own start"),
}


def paper_spacing(sampler) -> tuple[str, str]:
    """(spacing, why) for a sampler function or a functools.partial of one: its paper's code's, or leading."""
    name = getattr(getattr(sampler, "func", sampler), "__name__", "")
    return PAPER_SPACING.get(name, ("leading", "the DDIM paper's uniform skip"))


SPACINGS = {"leading": leading, "linspace": linspace, "trailing": trailing, "quadratic": quadratic}
NAMES = (*SPACINGS, "even", "logsnr")  # even: linspace but at ties, defined by the official code (its test is there)
GAMMA_SPACINGS = ("analytic_optimal",)  # made from the model's Gamma too (Analytic-DPM): `make(..., gamma=)`


def make(spacing: str, steps: int, schedule: Schedule, check: bool = True) -> Tensor:
    """The spacing named `spacing` (one of NAMES) with `steps` steps for `schedule`, checked by `check_start`
    (`check=False`: unchecked, for measuring what a refused start costs). Analytic-DPM's optimal trajectory
    ("analytic_optimal") needs the model's Gamma: diffusion.sampling.analytic.timesteps_for builds it."""
    if spacing in GAMMA_SPACINGS:
        raise UsageError(f"spacing={spacing} is Analytic-DPM's optimal trajectory, made from the model's Gamma: use it "
                         "with sampler=analytic_ddpm or sampler=analytic_ddim, which compute it")  # fmt: skip
    if spacing == "logsnr":
        ts = logsnr(steps, schedule)
    elif spacing == "even":
        ts = even(steps, schedule.T)
    elif spacing in SPACINGS:
        ts = SPACINGS[spacing](steps, schedule.T)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: choose one of {', '.join(NAMES + GAMMA_SPACINGS)}")
    if check:
        check_start(ts, schedule, spacing)
    return ts


# -------------------------------------------------------------------- the start: pure noise
START_SIGNAL = 0.05  # sqrt(alpha_bar) a first step may keep beyond the schedule's own at T-1; see check_start
START_WARNING = 0.1  # above this, a start the stride clause admits is said out loud (StartWarning)


def check_start(timesteps: Tensor | Sequence[int], schedule: Schedule, spacing: str | None = None) -> None:
    """Refuse a sequence whose first timestep t0 is not pure noise: every sampler starts from x_T ~ N(0, I).

    Accepted when sqrt(abar[t0]) <= sqrt(abar[T-1]) + START_SIGNAL (what the mixture tolerates: docs/sampling.md), or
    when the skipped top is no longer than the first step (T-1 - t0 <= t0 - t1: coarse grids, which PNDM needs on the
    cosine schedule), and said out loud (StartWarning) when such a start keeps more than START_WARNING of the
    signal. The schedule's own end admits toy schedules that never reach noise. To start at t0 on purpose (from an x
    that is x_t0, e.g. SDEdit), pass
    the schedule cut there, Schedule(schedule.betas[: t0 + 1]): the visited alpha_bar are the same.
    """
    if len(timesteps) == 0:
        raise ValueError("timesteps must hold at least one step")
    head = [int(t) for t in timesteps[:2]]
    t0, T = head[0], schedule.T
    first, end = float(schedule.alphas_cumprod[t0]) ** 0.5, float(schedule.alphas_cumprod[T - 1]) ** 0.5
    stride = t0 - head[1] if len(head) > 1 else 0
    if first <= end + START_SIGNAL:
        return
    if T - 1 - t0 <= stride:  # admitted (coarse grids need it), but said whenever it keeps much of the signal
        if first > START_WARNING:
            warnings.warn(
                f"{_what(timesteps, spacing)} at t={t0} of T={T}, where sqrt(alpha_bar)={first:.3f} ({schedule}) of "
                "the signal is left, but sampling starts from pure noise: expect washed-out samples; a spacing that "
                "starts at T-1 (trailing, linspace, logsnr) avoids it",
                StartWarning,
                stacklevel=3,
            )
        return
    why = " (it starts at 0.8 T by definition, made for the linear schedule)" if spacing == "quadratic" else ""
    raise UsageError(
        f"{_what(timesteps, spacing)} at t={t0} of T={T}, where sqrt(alpha_bar)={first:.3f} ({schedule}; {end:.3f} "
        f"at T-1), but every sampler starts from pure noise N(0, I), which lacks that signal{why}: use "
        f"spacing=trailing, linspace or logsnr (they start at the noisy end), or timesteps starting within one step of "
        f"T-1; to start "
        f"at t={t0} on purpose, from an x at that noise level, pass the schedule cut there: "
        f"Schedule(schedule.betas[: t0 + 1])"
    )


class StartWarning(UserWarning):
    """A sampler starts from pure noise at a timestep that still holds much of the signal (check_start)."""


def _what(timesteps: Tensor | Sequence[int], spacing: str | None) -> str:
    n = len(timesteps)
    if spacing:
        return f"the {spacing} spacing with {n} steps starts"
    return f"these {n} timesteps start" if n > 1 else "a single timestep starts"


# -------------------------------------------------------------------- integer helpers
def _round_div(a: np.ndarray, b: int) -> np.ndarray:
    """round(a / b) for integers a >= 0 and b > 0, ties to even (as Python's and numpy's round), exactly."""
    q, r = np.divmod(a, b)
    return q + ((2 * r > b) | ((2 * r == b) & (q % 2 == 1)))


def _descending(ts: np.ndarray) -> Tensor:
    return torch.from_numpy(np.sort(ts)[::-1].astype(np.int64))


def _check(steps: int, T: int) -> None:
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
