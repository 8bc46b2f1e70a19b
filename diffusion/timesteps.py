"""Timestep sequences for few-step sampling: descending int64 tensors of S steps drawn from 0 .. T-1.

Fewer steps is a shorter sequence, not a new process: every sampler walks the given timesteps and lands on
clean data (t = -1) after the last one. `SPACINGS` need only T; `logsnr` needs the schedule itself, and
`make(name, steps, schedule)` builds any of them by name (what sample.py calls); Analytic-DPM's optimal trajectory
also needs the model's Gamma (`make(..., gamma=)`). The uniform spacings are integer arithmetic, exact for every S
and T (a float stride such as arange(T, 0, -T / S) can yield S+1 steps; `even` keeps the official code's float sum
on purpose). Every
sampler starts from x_T ~ N(0, I), so `check_start` (called by make and by every sampler) refuses a sequence whose
first timestep still holds signal.
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
# LEADING (issue 12). The DDIM code's k = T // S stopped `leading` far below T-1 when T/3 < S < T. On the exact
# mixture (benchmarks/leading_spacing.py -> results/leading_spacing.md: 1000 samples, no clipping), the share of DDIM
# (eta = 0) samples that land on another mode than 1000 DDIM steps from T-1 from the same x_T, linear / cosine:
#   old: S = 300 (first step 897) 0.6% / 8.9%, S = 400 (798) 1.9% / 15.6%, S = 700 (699) 4.8% / 19.9%;
#   shifted up to start at T-1: 0%, but the last step jumps from t = 201 (S = 400) to clean data: Frechet 1.48 / 1.06
#   against 0.17; the DDIM code's range(0, T, k): 0%, with 334 / 500 / 1000 steps; trailing and floor(i T / S): 0%.
# DDPM ranks them alike (S = 400, cosine, Frechet: old 1.76, floor 0.16). So `leading` is floor(i T / S), the DDIM
# paper's own rule: S steps exactly, the old values wherever S divides T, the first step within one stride of T-1.
def leading(steps: int, T: int) -> Tensor:
    """The DDIM paper's uniform skip tau_i = floor(c i), i = 0 .. S-1, with c = T / S (Song et al. 2021, app. D.2):
    0, k, 2k, ... for k = T / S when S divides T (the DDIM code's range(0, T, k)); first step T - ceil(T / S).

    The DDIM code's integer k = T // S instead stops far below T-1 when T/3 < S < T (S = 400: 798); see LEADING.
    One step is [T-1]: the formula's [0] would ask for clean data from pure noise at t = 0.
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
    steps, the stride added up in float64 and rounded ties to even, minus 1. It is `linspace` but at ties, where
    the 1-based rounding and the float sum's drift move a step by one (e.g. S = 3: 499, not 500; 3 of 25 steps at
    S = 25): kept exactly, so that the paper's tables are reproduced on the paper's own timesteps."""
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

    At 50+ steps the floors repeat the smallest timesteps (each repeat a wasted model evaluation in the DDIM code);
    here a repeat is moved up to the next free integer so that every step moves, which lifts the first step to S-1
    once S > 0.8 T. Its start keeps sqrt(alpha_bar) = 0.04 of signal on the linear schedule (as in the paper), but
    0.31 on the cosine one, where `check_start` refuses it.
    """
    _check(steps, T)
    i = np.arange(steps)
    floors = 4 * T * i**2 // (5 * (steps - 1) ** 2) if steps > 1 else np.array([4 * T // 5])
    return _descending(np.maximum.accumulate(floors - i) + i)  # t_i = max(floor_i, t_{i-1} + 1)


# LOGSNR_END (issue 12). A grid of S points ending at t = 0 (diffusers' final_sigmas_type="zero") spends its last
# model call at t = 0, where sigma = 0.006 (cosine) leaves nothing to denoise, and the other S - 1 steps are 1 + 1/(S-1)
# times as wide in lambda as the papers'. On the exact mixture (seed 1, 10000 samples, Frechet distance / paired RMS
# against the exact ODE endpoint; floor 0.024), cosine, 10 NFE: UniPC-2 0.0425 / 0.082 -> 0.0361 / 0.071,
# DPM-Solver++(2M) 0.0553 / 0.085 -> 0.0449 / 0.077, DDIM 0.182 / 0.093 -> 0.155 / 0.086; 5 NFE: UniPC-2 4.38 -> 0.61;
# 20 NFE: within noise (0.0336 / 0.043 -> 0.0333 / 0.041). The linear schedule alike. The official codes' own ending
# (their last step lands on t = 0 and returns x there) gave the same figures to two digits.
def logsnr(steps: int, schedule: Schedule) -> Tensor:
    """Uniform in lambda_t = log(sqrt(abar_t / (1 - abar_t))) from the noisiest usable timestep towards t = 0
    (DPM-Solver, Lu et al. 2022): the official code's grid of S + 1 points from there to t = 0, whose first S are
    the S model calls. Its last step, first order onto t = 0, is our step onto clean data from the S-th point (they
    differ by sigma_0 times the predicted noise: at most 0.01 per pixel). LOGSNR_END: why not S points ending at 0.

    Each lambda is mapped to the nearest integer timestep (linear interpolation of lambda over t, rounded); where
    several round to the same t (either end, at many steps), they are spread to the nearest free integers.
    The grid starts at `noisiest_usable`: T-1 for the linear schedule, 995 of the cosine schedule at T = 1000, whose
    final betas (clipped at 0.999) send lambda off a cliff (-5.4 to -9.9 in three steps). Starting at T-1 would
    spend the first steps of a 10-step grid at 999, 998, 997, 994 and triple DPM-Solver's error there. Repeats at
    the top are spread downwards, so the grid starts there for every S up to start + 1 (it was lifted back to 999
    from S = 53 on the cosine schedule, where PNDM at 100 steps sent 1.9% of the mixture to another mode, 0% at 50).
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


# The official DPM-Solver code (and UniPC's, built on it) drops a discrete schedule's timesteps whose lambda is below
# this (NoiseScheduleVP.numerical_clip_alpha: "very useful for ... the cosine schedule").
LAMBDA_MIN = -5.1


def noisiest_usable(schedule: Schedule) -> int:
    """The noisiest timestep whose lambda is at least LAMBDA_MIN = -5.1, where the official DPM-Solver code cuts
    discrete schedules: T-1 for the linear schedule (lambda -5.07), 995 for the cosine one at T = 1000 (996-999 fall
    to -5.4, -5.8, -6.5, -9.9: the clipped betas' cliff; the paper stops the continuous cosine schedule at lambda -4.8,
    t = 0.9946, for the same reason), 48 of 50 for the cosine one at T = 50, whose betas climb gradually to the clip.
    A rule on beta (< 1/2) found 996 at T = 1000 but 46 of 50, where sqrt(abar) = 0.09 still holds signal, and
    check_start refused logsnr itself there for 40 of the 50 step counts. Every timestep above the start has
    lambda < -5.1 (sqrt(abar) < 0.006): the grid skips only pure noise."""
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

    Accepted when sqrt(abar[t0]) <= sqrt(abar[T-1]) + START_SIGNAL, or when the skipped top is no longer than the
    first step (T-1 - t0 <= t0 - t1). Started at t0 and stepped through every integer, DDIM sends 0.7%, 1.9%, 4.7%,
    9% of the mixture's samples to another mode at sqrt(abar[t0]) = 0.02, 0.04, 0.08, 0.16, on either schedule
    (results/leading_spacing.md): 0.05 admits the DDIM paper's quadratic spacing on the linear schedule (0.039; the
    best Frechet distance at 10 steps there) and refuses it on the cosine one (0.31: 15% at every step count). The
    stride clause admits coarse grids such as 10 `leading` steps on the cosine schedule (900: 0.15), which PNDM
    needs there (it diverges from T-1), and the schedule's own end admits toy schedules that never reach noise; a
    start the stride clause admits above START_WARNING (0.1) is said out loud (StartWarning: cosine + leading at 2-8
    steps keeps 0.70 ... 0.19 of the signal). To start at t0 on purpose (from an x that is x_t0, e.g. SDEdit), pass
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
        "at T-1), "
        f"but every sampler starts from pure noise N(0, I), which lacks that signal{why}: use spacing=trailing, "
        f"linspace or logsnr (they start at the noisy end), or timesteps starting within one step of T-1; to start "
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
