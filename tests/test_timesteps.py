"""Timestep spacings: descending, distinct, in range, and where each paper puts them."""

import pytest
import torch

from diffusion import schedule, timesteps


def _lam(sched: schedule.Schedule, ts: torch.Tensor) -> torch.Tensor:
    abar = sched.alphas_cumprod[ts]
    return 0.5 * (abar / (1 - abar)).log()


@pytest.mark.parametrize("name", timesteps.NAMES)
def test_every_spacing_is_descending_distinct_and_in_range(name):
    for sched in (schedule.linear(1000), schedule.cosine(1000), schedule.linear(7)):
        for steps in sorted({1, 2, 3, 10, 50, sched.T} & set(range(1, sched.T + 1))):
            ts = timesteps.make(name, steps, sched)
            assert ts.dtype == torch.int64 and ts.shape == (steps,), (name, steps)
            assert bool((ts[:-1] > ts[1:]).all()), (name, steps, ts)
            assert 0 <= int(ts.min()) and int(ts.max()) <= sched.T - 1, (name, steps, ts)


def test_uniform_spacings_match_the_papers():
    assert timesteps.leading(10, 1000).tolist() == list(range(900, -1, -100))
    assert timesteps.trailing(10, 1000).tolist() == list(range(999, 0, -100))
    assert timesteps.linspace(4, 1000).tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("sched", [schedule.linear(1000), schedule.cosine(1000)], ids=str)
def test_logsnr_is_uniform_in_log_snr_from_the_first_to_the_last_timestep(sched):
    ts = timesteps.logsnr(8, sched)
    first = int((sched.betas < 0.5).nonzero().max())  # T-1 for linear; below the cosine's clipped tail
    assert ts[0] == first and ts[-1] == 0
    lam = _lam(sched, ts)
    target = torch.linspace(float(lam[0]), float(lam[-1]), 8, dtype=torch.float64)
    # rounding t to an integer moves lambda by at most half the local slope |d lambda / dt|
    slope = (_lam(sched, (ts + 1).clamp(max=sched.T - 1)) - _lam(sched, (ts - 1).clamp(min=0))).abs()
    assert bool(((lam - target).abs() <= slope / 2 + 1e-9).all()), (lam, target)


def test_logsnr_starts_below_the_cosine_schedules_cliff():
    """The cosine schedule's last betas (0.56, 0.75, 0.999) drop lambda by 3.5 in one step: the grid starts
    before them (the paper's t_T = 0.9946 for the same schedule), so a 10-step grid has no wasted steps there."""
    assert timesteps.logsnr(10, schedule.linear(1000))[0] == 999
    ts = timesteps.logsnr(10, schedule.cosine(1000)).tolist()
    assert ts[0] == 996 and ts[1] < 990


def test_logsnr_spreads_repeats_to_free_integers():
    sched = schedule.linear(1000)
    ts = timesteps.logsnr(200, sched)  # the low-noise end is dense in lambda: many targets round to t < 10
    assert ts[-10:].tolist() == list(range(9, -1, -1))
    assert timesteps.logsnr(1000, sched).tolist() == list(range(999, -1, -1))


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
