"""Timestep spacings: S distinct descending steps in range for every S, where each paper puts them, and no sampler
starting from pure noise at a timestep that still holds signal."""

import warnings

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion import sampling, schedule, timesteps
from diffusion.errors import UsageError
from diffusion.mixture import GaussianMixture

from .conftest import CONF

COMMON_STEPS = (10, 20, 50, 100, 250, 1000)


def _lam(sched: schedule.Schedule, ts: torch.Tensor) -> torch.Tensor:
    abar = sched.alphas_cumprod[ts]
    return 0.5 * (abar / (1 - abar)).log()


# -------------------------------------------------------------------- every S, every spacing
def definition(name: str, S: int, T: int) -> np.ndarray:
    """Each uniform spacing from its formula, in float64 (exact here: a quotient of integers below 2^53 is
    correctly rounded, and one that is not a whole or half integer is at least 1/(2S) away from one)."""
    i = np.arange(S)
    if S == 1 and name in ("leading", "linspace"):
        return np.array([T - 1])
    if name == "leading":  # floor(c i) with c = T / S
        return np.floor(i * T / S)[::-1]
    if name == "linspace":
        return np.round(i * (T - 1) / (S - 1))[::-1]  # numpy rounds ties to even
    if name == "trailing":  # round(j T / S) - 1 for j = S .. 1
        return np.round((S - i) * T / S) - 1
    raise AssertionError(name)


def first_step(name: str, S: int, T: int, sched: schedule.Schedule | None = None) -> int:
    """Where each spacing starts, by its definition."""
    if name == "leading":
        return T - 1 if S == 1 else T - -(-T // S)  # T - ceil(T / S): one stride of c = T / S below T
    if name == "quadratic":
        return max(4 * T // 5, S - 1)  # floor(0.8 T), lifted when repeats are moved up
    if name == "logsnr":  # the noisiest t with lambda >= -5.1 (the official DPM-Solver code's cut), in numpy
        if S == 1:  # one step: no grid to spread, T-1 as every spacing
            return T - 1
        abar = sched.alphas_cumprod.numpy()
        return max(int(np.flatnonzero(np.log(abar / (1 - abar)) / 2 >= -5.1)[-1]), S - 1)
    return T - 1  # linspace, trailing


def assert_valid(ts: torch.Tensor, S: int, T: int, what) -> np.ndarray:
    assert ts.dtype == torch.int64 and ts.shape == (S,), what
    a = ts.numpy()
    assert (a[:-1] > a[1:]).all() and 0 <= a[-1] and a[0] <= T - 1, what
    return a


@pytest.mark.parametrize("T", [50, 1000, 4000])
@pytest.mark.parametrize("name", list(timesteps.SPACINGS))
def test_every_spacing_has_S_distinct_descending_steps_for_every_S(name, T):
    schedules = [schedule.linear(T), schedule.cosine(T)] if T == 1000 and name != "quadratic" else []
    for S in range(1, T + 1):
        ts = timesteps.SPACINGS[name](S, T)
        a = assert_valid(ts, S, T, (name, S))
        assert a[0] == first_step(name, S, T), (name, S, a[:3])
        for sched in schedules:  # they start from noise: sample.py and the training preview (leading) never refuse
            timesteps.check_start(ts, sched)
        if name != "quadratic":
            assert np.array_equal(a, definition(name, S, T)), (name, S)
            continue
        # floor(0.8 T i^2 / (S-1)^2), each repeat moved up to the next free integer: ascending, every step at or
        # above its floor, and above it only where it is one more than the step before
        floors = np.array([4 * T // 5]) if S == 1 else 4 * T * np.arange(S) ** 2 // (5 * (S - 1) ** 2)
        up, moved = a[::-1], a[::-1][1:] > floors[1:]
        assert up[0] == floors[0] and (up >= floors).all() and (up[1:][moved] == up[:-1][moved] + 1).all(), S


LOGSNR_SCHEDULES = [schedule.linear(1000), schedule.cosine(1000), schedule.cosine(50), schedule.cosine(100),
                    schedule.linear(50), schedule.cosine(4000),
                    *[schedule.cosine(T) for T in range(2, 31)]]  # fmt: skip


@pytest.mark.parametrize("sched", LOGSNR_SCHEDULES, ids=str)
def test_logsnr_has_S_distinct_descending_steps_for_every_S(sched):
    """Never refused by check_start: a rule on beta (< 1/2) started the cosine schedule at T = 50 at t = 46, still
    signal (sqrt(abar) = 0.09), and logsnr refused itself for 40 of the 50 step counts."""
    for S in range(1, sched.T + 1):
        ts = timesteps.logsnr(S, sched)
        a = assert_valid(ts, S, sched.T, S)
        timesteps.check_start(ts, sched)
        assert a[0] == first_step("logsnr", S, sched.T, sched), (S, a)


def test_the_old_float_strides_are_gone():
    """arange(T, 0, -T / S) gave trailing S+1 steps ending at -1 for 62 S at T = 1000, and T // S left leading's
    first step at 798 for S = 400 (sqrt(alpha_bar) = 0.04, the sampler starting from pure noise)."""
    for S in (61, 103, 121, 122, 201, 206, 217, 223, 227, 233):
        assert len(timesteps.trailing(S, 1000)) == S and int(timesteps.trailing(S, 1000)[-1]) >= 0
    assert timesteps.leading(400, 1000)[:3].tolist() == [997, 995, 992]
    assert timesteps.leading(700, 1000)[0] == 998 and timesteps.leading(334, 1000)[0] == 997


def test_uniform_spacings_match_the_papers():
    assert timesteps.leading(10, 1000).tolist() == list(range(900, -1, -100))
    assert timesteps.trailing(10, 1000).tolist() == list(range(999, 0, -100))
    assert timesteps.linspace(4, 1000).tolist() == [999, 666, 333, 0]
    assert timesteps.quadratic(5, 1000).tolist() == [800, 450, 200, 50, 0]  # 800 (i / 4)^2
    for T in (1000, 4000):  # where S divides T, leading is the DDIM code's range(0, T, T // S)
        for S in (S for S in range(1, T + 1) if T % S == 0 and S > 1):
            assert timesteps.leading(S, T).tolist() == list(range(0, T, T // S))[::-1], (S, T)
    for name in ("leading", "linspace", "trailing"):  # one step starts where the sampler's pure noise is
        assert timesteps.SPACINGS[name](1, 1000).tolist() == [999], name
    for sched in (schedule.linear(1000), schedule.cosine(1000), schedule.cosine(9)):  # cosine(9): 0.17 at T-2
        assert timesteps.logsnr(1, sched).tolist() == [sched.T - 1]


# -------------------------------------------------------------------- logsnr
@pytest.mark.parametrize("sched", [schedule.linear(1000), schedule.cosine(1000)], ids=str)
def test_logsnr_is_the_first_S_of_S_plus_1_points_uniform_in_log_snr_down_to_t_0(sched):
    """The official DPM-Solver / UniPC grid: S + 1 points from the start to t = 0, a model call at the first S;
    our step onto clean data replaces their last one onto t = 0 (timesteps.LOGSNR_END)."""
    ts = timesteps.logsnr(8, sched)
    assert ts[0] == first_step("logsnr", 8, sched.T, sched) and ts[-1] > 0  # T-1 for linear; 995 for cosine
    lam = _lam(sched, ts)
    target = torch.linspace(float(lam[0]), float(_lam(sched, torch.tensor([0]))[0]), 9, dtype=torch.float64)[:-1]
    # rounding t to an integer moves lambda by at most half the local slope |d lambda / dt|
    slope = (_lam(sched, (ts + 1).clamp(max=sched.T - 1)) - _lam(sched, (ts - 1).clamp(min=0))).abs()
    assert bool(((lam - target).abs() <= slope / 2 + 1e-9).all()), (lam, target)


def test_logsnr_starts_below_the_cosine_schedules_cliff():
    """The cosine schedule's last betas (0.56, 0.75, 0.999) drop lambda from -5.4 to -9.9 in three steps: the grid
    starts before them, at the official DPM-Solver code's cut (lambda >= -5.1), so a 10-step grid has no wasted
    steps there; the linear schedule (lambda -5.07 at T-1) starts at T-1."""
    assert timesteps.logsnr(10, schedule.linear(1000))[0] == 999
    ts = timesteps.logsnr(10, schedule.cosine(1000)).tolist()
    assert ts[0] == 995 and ts[1] < 990
    assert timesteps.logsnr(10, schedule.cosine(50))[0] == 48  # sqrt(abar) 0.031: pure noise for check_start


def test_logsnr_spreads_repeats_to_free_integers():
    sched = schedule.linear(1000)
    ts = timesteps.logsnr(200, sched)  # the low-noise end is dense in lambda: many targets round to t < 10
    assert ts[-10:].tolist() == list(range(9, -1, -1))
    assert timesteps.logsnr(1000, sched).tolist() == list(range(999, -1, -1))
    cosine = schedule.cosine(1000)  # repeats at the top are spread downwards: the grid still starts at 995
    assert timesteps.logsnr(100, cosine)[:3].tolist() == [995, 994, 993]
    assert timesteps.logsnr(999, cosine).tolist() == list(range(998, -1, -1))


# -------------------------------------------------------------------- make
def test_make_builds_any_spacing_by_name_and_rejects_unknown_names():
    sched = schedule.linear(1000)
    assert torch.equal(timesteps.make("leading", 10, sched), timesteps.leading(10, 1000))
    assert torch.equal(timesteps.make("logsnr", 10, sched), timesteps.logsnr(10, sched))
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform': choose one of leading, .*logsnr"):
        timesteps.make("uniform", 10, sched)


@pytest.mark.parametrize("name", timesteps.NAMES)
def test_steps_out_of_range_are_rejected(name):
    sched = schedule.linear(1000)
    for steps in (0, -1, 1001):
        with pytest.raises(ValueError, match="steps must be between 1 and T=1000"):
            timesteps.make(name, steps, sched)


# -------------------------------------------------------------------- the start: pure noise
SAMPLERS = [sampling.ddpm, sampling.ddim, sampling.pndm, sampling.s_pndm, sampling.plms, sampling.dpm_solver]


def test_every_samplers_default_spacing_starts_from_noise_on_every_schedule():
    """sample.py's defaults (spacing=null: each sampler's own; steps=50), without even a StartWarning."""
    cfg = OmegaConf.load(CONF / "sample.yaml")
    assert cfg.spacing is None and cfg.steps == 50
    for sampler in sorted((CONF / "sampler").glob("*.yaml")):
        target = OmegaConf.load(sampler).get("_target_", "diffusion.sampling.ddim")  # deepcache.yaml: DDIM's
        spacing, why = timesteps.PAPER_SPACING[target.rsplit(".", 1)[-1]]
        for path in sorted((CONF / "schedule").glob("*.yaml")):
            sched = instantiate(OmegaConf.load(path))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                timesteps.check_start(timesteps.make(spacing, cfg.steps, sched), sched)


def test_a_start_that_keeps_much_of_the_signal_is_said_out_loud():
    """cosine + leading at 2-8 steps starts at sqrt(alpha_bar) 0.70 ... 0.19 (admitted: one stride below T-1)."""
    sched = schedule.cosine(1000)
    for steps in range(2, 9):
        with pytest.warns(timesteps.StartWarning, match="sampling starts from pure noise"):
            timesteps.make("leading", steps, sched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timesteps.make("leading", 10, schedule.linear(1000))  # 900 on the linear schedule: 0.02, silent


@pytest.mark.parametrize("sched", [schedule.linear(1000), schedule.cosine(1000)], ids=str)
def test_every_spacing_at_common_step_counts_starts_from_noise(sched):
    """All but quadratic on the cosine schedule: its first step, 800, keeps sqrt(alpha_bar) = 0.31 there."""
    for name in timesteps.NAMES:
        for steps in COMMON_STEPS:
            if name == "quadratic" and sched.name == "cosine" and steps < 801:
                with pytest.raises(UsageError, match=f"quadratic spacing with {steps} steps starts at t=800 "):
                    timesteps.make(name, steps, sched)
            else:
                timesteps.make(name, steps, sched)


def test_a_start_that_keeps_signal_is_refused_by_make_and_every_sampler():
    sched = schedule.cosine(1000)
    message = (
        r"quadratic spacing with 20 steps starts at t=800 of T=1000, where sqrt\(alpha_bar\)=0\.305 "
        r"\(Schedule\(cosine, T=1000\); 0\.000 at T-1\), .*pure noise.*spacing=trailing"
    )
    with pytest.raises(UsageError, match=message):
        timesteps.make("quadratic", 20, sched)
    x_star = torch.full((1, 4), 0.5, dtype=torch.float64)
    model, x = GaussianMixture(x_star, torch.ones(1)).model(sched), torch.randn(2, 4, dtype=torch.float64)
    old_leading = torch.arange(400).flip(0) * 2  # the old leading(400, 1000): 798, 796, ..., 0
    for sampler in SAMPLERS:
        with pytest.raises(UsageError, match=r"these 400 timesteps start at t=798 .*sqrt\(alpha_bar\)=0\.308"):
            sampler(model, x, sched, old_leading)


def test_the_threshold_is_signal_beyond_the_schedules_own_end():
    """Dense steps from t0 pass while sqrt(abar[t0]) <= sqrt(abar[T-1]) + START_SIGNAL and are refused above it."""
    for sched in (schedule.linear(1000), schedule.cosine(1000), schedule.linear(100)):
        root = sched.alphas_cumprod.sqrt()
        limit = float(root[-1]) + timesteps.START_SIGNAL
        t_ok = int((root <= limit).nonzero().min())  # the earliest start allowed
        timesteps.check_start(torch.arange(t_ok, -1, -1), sched)
        with pytest.raises(UsageError, match=f"start at t={t_ok - 1} "):
            timesteps.check_start(torch.arange(t_ok - 1, -1, -1), sched)


def test_a_coarse_grid_may_skip_less_than_its_first_step():
    """leading(10) on the cosine schedule starts at 900 (sqrt(abar) = 0.15): no 10-step grid of stride 100 starts
    higher. Skipping more of the top than the first step is refused, and so is a single step below T-1."""
    sched = schedule.cosine(1000)
    timesteps.check_start(torch.tensor([900, 800, 0]), sched)  # skips 99 timesteps, first step 100
    timesteps.check_start(torch.tensor([899, 100]), sched)  # skips 100, first step 799
    with pytest.raises(UsageError, match="start at t=899 "):
        timesteps.check_start(torch.tensor([899, 800, 0]), sched)  # skips 100, first step 99
    with pytest.raises(UsageError, match="a single timestep starts at t=900 "):
        timesteps.check_start(torch.tensor([900]), sched)


def test_a_deliberate_late_start_passes_with_the_schedule_cut_there():
    """Starting from x_t0 on purpose (e.g. SDEdit) is said by cutting the schedule at t0: same alpha_bar."""
    sched = schedule.linear(1000)
    data = GaussianMixture(torch.tensor([[0.5, -0.5]], dtype=torch.float64), torch.ones(1), 0.0)
    ts, x = torch.arange(500, -1, -50), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(UsageError, match="Schedule\\(schedule.betas\\[: t0 \\+ 1\\]\\)"):
        sampling.ddim(data.model(sched), x, sched, ts)
    cut = schedule.Schedule(sched.betas[:501])
    assert torch.allclose(sampling.ddim(data.model(sched), x, cut, ts, clip=False), data.means.expand(3, 2))


# -------------------------------------------------------------------- benchmarks/leading_spacing.py
def test_the_leading_spacing_benchmark_measures_every_spacing(tmp_path):
    """It looked spacings up in SPACINGS, which lacks even and logsnr, and raised once `even` joined NAMES."""
    from benchmarks.leading_spacing import main

    out = str(tmp_path / "out.md")  # only the table that broke: no --steps or --starts tables
    text = main(["--samples", "20", "--steps", "", "--common", "10", "--starts", "", "--out", out])
    assert (tmp_path / "out.md").read_text() == text
    header = "| sampler | S | " + " | ".join(timesteps.NAMES) + " |"
    assert text.count(header) == 2  # both schedules
    rows = [line for line in text.splitlines() if line.startswith(("| ddim η=0 | 10 |", "| pndm | 10 |"))]
    assert len(rows) == 4 and all(row.count("t₀=") == len(timesteps.NAMES) for row in rows)
    assert "(t₀=800, √ᾱ=0.305)" in text  # quadratic on the cosine schedule, which check_start refuses, measured
