"""DeepCache: exact at interval 1 under real samplers, skips exactly the blocks deeper than the branch, follows
its schedule of full steps (the official non-uniform rule checked against hand-computed cases), caches the block
the official --branch names, keeps the exact deep feature, never reuses a stale cache, counts MACs right."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from diffusion import sampling, schedule, timesteps
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import (
    DeepCache,
    cached_cost,
    macs_speedup,
    nonuniform_steps,
    official_steps,
    uniform_steps,
)
from diffusion.wrappers.macs import count_macs

from .conftest import compose_config
from .test_unet import perturbed

LAST_BRANCH = 3 * (2 + 1) - 2  # SMALL: 3 levels of 2 blocks, branches 0..7 (the last level has no downsample)
SCHED = schedule.linear(T=1000)
SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, resolution=32)
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> UNet:
    return perturbed(UNet(**SMALL)).eval()


@pytest.fixture(scope="module")
def hooked(unet) -> tuple[UNet, list, set]:
    """A copy of `unet` whose blocks append their names to a list when they run: (model, list, all names)."""
    model, ran = copy.deepcopy(unet), []
    return model, ran, block_calls(model, ran)


def noise(seed: int = 0, batch: int = 2) -> torch.Tensor:
    """x [batch, 3, 16, 16]: the UNet runs at any size divisible by 4; 16x16 keeps the tests fast."""
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def prk_like(model, x, schedule, ts, *, generator=None):
    """PNDM's call pattern (pseudo Runge-Kutta): per step t -> t - d, calls at t, t - d/2 twice and t - d."""
    ts = [int(t) for t in ts]
    with torch.no_grad():
        for t, s in zip(ts, ts[1:], strict=False):
            for tau in (t, (t + s) // 2, (t + s) // 2, s):
                x = x - 0.05 * model(x, torch.full((len(x),), tau))
    return x


def block_calls(model: UNet, ran: list) -> set:
    """Hook every block of `model` to append its name to `ran`: ('down', i, j), ('up', i, k), resamples, 'mid'.
    Returns the set of all names."""
    named = [("mid", model.mid)]
    for path, levels in (("down", model.down), ("up", model.up)):
        for i, level in enumerate(levels):
            named += [((path, i, j), block) for j, block in enumerate(level.res)]
            if level.resample is not None:
                named.append(((path, i, "resample"), level.resample))
    for name, module in named:
        module.register_forward_hook(lambda m, a, o, name=name: ran.append(name))
    return {name for name, _ in named}


def shallow_blocks(branch: int, levels: int = 3, n: int = 2) -> set:
    """What a cached call must run: every block whose skip lies at or above the branch, in the flat skip order
    conv_in (-1), then per level its n blocks and its downsample; the up block popping skip k runs iff k <= branch."""
    flat = lambda i, j: i * (n + 1) + j  # noqa: E731  down block j of level i (j = n: the downsample)
    ran = {("down", i, j) for i in range(levels) for j in range(n) if flat(i, j) <= branch}
    ran |= {("down", i, "resample") for i in range(levels - 1) if flat(i, n) <= branch}
    for i in range(levels):
        ran |= {("up", i, k) for k in range(n) if flat(i, n - 1 - k) <= branch}
        if i == 0 or flat(i - 1, n) <= branch:  # block n pops the previous level's downsample (conv_in for i = 0)
            ran.add(("up", i, n))
            if i > 0:
                ran.add(("up", i, "resample"))
    return ran


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("schedule", ["uniform", "nonuniform", "official"])
def test_interval_one_is_the_plain_unet_bit_for_bit_under_ddim(unet, schedule):
    ts = timesteps.leading(6, SCHED.T)
    cache = DeepCache(unet, ts, interval=1, schedule=schedule)
    plain = sampling.ddim(unet, noise(), SCHED, ts)
    assert torch.equal(sampling.ddim(cache, noise(), SCHED, ts), plain)
    assert (cache.full_calls, cache.shallow_calls) == (6, 0)


def test_interval_one_is_exact_at_the_extra_timesteps_of_a_runge_kutta_start(unet):
    ts = timesteps.leading(3, SCHED.T)
    cache = DeepCache(unet, ts, interval=1)
    assert torch.equal(prk_like(cache, noise(), SCHED, ts), prk_like(unet, noise(), SCHED, ts))
    assert cache.shallow_calls == 0


@pytest.mark.parametrize("branch", range(LAST_BRANCH + 1))
def test_a_cached_call_right_after_a_full_one_returns_the_full_output(unet, branch):
    """Same x and t: the cached call sees the exact deep feature, so it reproduces the full call bit for bit."""
    x, t = noise(1), torch.tensor([420, 420])
    cache = DeepCache(unet, [900, 660, 420], interval=2, branch=branch)  # full steps: 900 and 420
    with torch.no_grad():
        full = cache(x, t)
        again = cache(x, t)
        assert (cache.full_calls, cache.shallow_calls) == (1, 1)
        assert torch.equal(full, unet(x, t)) and torch.equal(again, full)


# ---------------------------------------------------------------- what runs, and when


@pytest.mark.parametrize("branch", range(LAST_BRANCH + 1))
def test_cached_calls_skip_exactly_the_blocks_deeper_than_the_branch(hooked, branch):
    (model, ran, every), ts = hooked, timesteps.leading(4, SCHED.T)
    cache, kinds = DeepCache(model, ts, interval=2, branch=branch), []
    ran.clear()
    with torch.no_grad():
        for t in ts:
            cache(noise(), torch.full((2,), int(t)))
            kinds.append(set(ran))
            ran.clear()
    assert kinds[0] == kinds[2] == every  # full steps 0 and 2 run every block
    assert kinds[1] == kinds[3] == shallow_blocks(branch)
    assert "mid" not in kinds[1] and len(kinds[1]) < len(every)


@pytest.mark.parametrize(
    "interval, schedule, steps",
    [(3, "uniform", 8), (4, "uniform", 9), (2, "nonuniform", 10), (3, "nonuniform", 12), (3, "official", 12)],
)
def test_full_calls_follow_the_schedule_under_ddim(hooked, interval, schedule, steps):
    (model, ran, _), ts = hooked, timesteps.leading(steps, SCHED.T)
    cache, full = DeepCache(model, ts, interval=interval, schedule=schedule), []
    ran.clear()

    def watched(x, t):  # which calls ran the middle block: the full ones
        eps = cache(x, t)
        full.append("mid" in ran)
        ran.clear()
        return eps

    sampling.ddim(watched, noise(), SCHED, ts)
    expected = {
        "uniform": lambda: list(range(0, steps, interval)),
        "nonuniform": lambda: nonuniform_steps(steps, interval),
        "official": lambda: official_steps(steps, interval, steps // 2, 1.4),  # centre 0.5 of an even step count
    }[schedule]()
    assert [i for i, f in enumerate(full) if f] == expected == cache.full_steps
    assert (cache.full_calls, cache.shallow_calls) == (len(expected), steps - len(expected))


def test_runge_kutta_extra_timesteps_reuse_the_cache(unet):
    """PNDM-like calls: only the first call at a full-step timestep is full; t - d/2 and repeats are cached."""
    ts = [900, 800, 700, 600]
    cache = DeepCache(unet, ts, interval=2)  # full steps at 900 and 700
    kinds = []
    counted = lambda x, t: (kinds.append(cache.full_calls), cache(x, t))[1]  # noqa: E731
    prk_like(counted, noise(), SCHED, ts)
    became_full = [b > a for a, b in zip(kinds, kinds[1:] + [cache.full_calls], strict=True)]
    # calls: (900 850 850 800) (800 750 750 700) (700 650 650 600)
    assert became_full == [True, False, False, False, False, False, False, True, False, False, False, False]


# ---------------------------------------------------------------- the non-uniform schedule


@pytest.mark.parametrize(
    "steps, interval, center, power", [(100, 3, 0.5, 1.4), (100, 10, 0.3, 1.2), (50, 5, 0.5, 2.0), (20, 2, 0.7, 1.0)]
)
def test_nonuniform_steps_follow_the_power_rule(steps, interval, center, power):
    got = nonuniform_steps(steps, interval, center, power)
    k, c = math.ceil(steps / interval), center * steps
    ls = np.linspace(-(c ** (1 / power)), (steps - c) ** (1 / power), k, endpoint=False)
    expected = np.unique(np.clip(np.rint(c + np.sign(ls) * np.abs(ls) ** power), 0, steps - 1)).astype(int)
    assert got == expected.tolist()
    assert got[0] == 0 and got == sorted(set(got)) and got[-1] < steps and len(got) <= k
    gaps = np.diff(got)
    if power > 1:  # dense around the centre, sparse at the ends
        middle = np.argmin(np.abs(np.array(got[:-1]) - c))
        assert gaps[middle] < min(gaps[0], gaps[-1])


def test_power_one_spreads_the_full_steps_evenly():
    assert nonuniform_steps(100, 10, 0.5, 1.0) == list(range(0, 100, 10))
    assert uniform_steps(10, 3) == [0, 3, 6, 9]


# ---------------------------------------------------------------- the official non-uniform rule, by hand
# The official rule (horseee/DeepCache, ddpm/functions/deepcache_denoising.py, sample_from_quad_center): k = ceil(S/N);
# points x_j = a (1 - j/k) + b j/k, j = 0..k, with a = (-c)^(1/p) = c^(1/p) e^(i pi/p) (principal root) and
# b = (S - c)^(1/p); v_j = int(Re x_j^p), truncated toward zero; distinct v sorted, first and last dropped, + c, and
# 0 in front; if that is not k steps, p -= 0.02 and again. Re x^p = |x|^p cos(p arg x). v_0 = -c and v_k = S - c up
# to rounding (int may give -c + 1 or S - c - 1): both are dropped anyway. With c = S/2, x_(k-j) = e^(i pi/p) conj(x_j),
# so v_(k-j) = -v_j before truncation: the values are odd about c.


@pytest.mark.parametrize(
    "steps, interval, center, power, expected",
    [
        # S=10, N=3: k=4. c=5, p=1.4: a = 5^0.714 e^(2.244 i) = -1.968 + 2.468i, b = 3.157.
        # x_1 = .75a + .25b = -0.687 + 1.851i: |x| 1.974, arg 1.926 -> 1.974^1.4 cos(2.697) = 2.592 * -0.903
        # = -2.34 -> -2
        # x_2 = (a + b)/2, arg = pi/2.8 -> p arg = pi/2, Re = 0 -> 0;  x_3: +2.34 (odd about c) -> 2
        # distinct: -5, -2, 0, 2, 5 -> inner -2, 0, 2 -> + 5: 3, 5, 7 -> [0, 3, 5, 7] (4 = k: p stays 1.4)
        (10, 3, 5, 1.4, [0, 3, 5, 7]),
        # S=100, N=10 (the paper's 100 DDIM steps): k=10, c=50, p=1.4: a = 16.351 e^(2.244 i), b = 16.351
        # Re x_j^p for j = 1..4: |x| 13.756, 11.334, 9.223, 7.682; arg 2.151, 2.017, 1.815, 1.516
        # -> -38.92, -28.43, -18.51, -9.09; j = 5: 0; j = 6..9 the negatives -> 9, 18, 28, 38 after truncation
        # inner -38 -28 -18 -9 0 9 18 28 38, + 50: 12 22 32 41 50 59 68 78 88
        (100, 10, 50, 1.4, [0, 12, 22, 32, 41, 50, 59, 68, 78, 88]),
        # S=20, N=5: k=4, c=8 off-centre, p=1.5: a = 8^(2/3) e^(2 pi i/3) = -2 + 3.464i, b = 12^(2/3) = 5.2415
        # x_1 = -0.190 + 2.598i: 2.605^1.5 cos(1.5 * 1.644) = 4.205 * -0.780 = -3.28 -> -3
        # x_2 =  1.621 + 1.732i: 2.372^1.5 cos(1.5 * 0.819) = 3.653 *  0.336 =  1.23 ->  1
        # x_3 =  3.431 + 0.866i: 3.539^1.5 cos(1.5 * 0.247) = 6.657 *  0.932 =  6.20 ->  6
        # inner -3, 1, 6, + 8: 5, 9, 14
        (20, 5, 8, 1.5, [0, 5, 9, 14]),
        # S=10, N=2: k=5, c=3, p=2: a = i sqrt(3), b = sqrt(7), so Re x^2 = 7u^2 - 3(1-u)^2 at u = j/5:
        # j=1: .28 - 1.92 = -1.64 -> -1; j=2: 1.12 - 1.08 = .04 -> 0; j=3: 2.52 - .48 = 2.04 -> 2;
        # j=4: 4.48 - .12 = 4.36 -> 4; inner -1 0 2 4, + 3: 2 3 5 7
        (10, 2, 3, 2.0, [0, 2, 3, 5, 7]),
        # S=12, N=2: k=6, c=0 (real arithmetic): v_j = 12 (j/6)^p. p=1.4: v_1 = 12 e^(-1.4 ln 6) = 0.977 -> 0, the
        # same as v_0 = 0, so distinct 0 2 4 6 9 12 (v_2..v_5 = 2.58 4.55 6.80 9.30) -> 5 steps, too few; p = 1.38:
        # v_1..v_5 = 12 e^(-1.38 ln(6/j)) = 1.012 2.635 4.611 6.858 9.330 -> 1 2 4 6 9: [0, 1, 2, 4, 6, 9]
        (12, 2, 0, 1.4, [0, 1, 2, 4, 6, 9]),
        # k=1: two points, both dropped: just step 0
        (5, 10, 2, 1.4, [0]),
        # N=1: every step full (the official SD pipeline's rule; the interval-1 wrapper is the plain model anyway)
        (7, 1, 3, 1.4, list(range(7))),
    ],
)
def test_official_rule_matches_hand_computed_cases(steps, interval, center, power, expected):
    assert official_steps(steps, interval, center, power) == expected


def test_official_rule_refuses_a_count_no_power_reaches():
    """S=6, N=2: k=3, c=3 = S/2, so the values are odd about c: -3, -v, v, 3 with v = 0.919 at p = 1.4
    (|x_1| = 1.157, arg 1.727: 1.157^1.4 cos(2.418) = 1.227 * -0.749) rising to 0.980 at p = 1.02: -v and v
    both truncate to 0 for every p, leaving [0, 3]. The DDPM code would go on with 2 full steps; we refuse."""
    with pytest.raises(ValueError, match=r"finds no power in \(1, 1.4\] that gives exactly 3 full steps among 6"):
        official_steps(6, 2, 3, 1.4)


def test_official_rule_gives_exactly_k_sorted_steps_from_step_0_or_refuses():
    """Every S <= 100 and N <= 10 at five centres: exactly ceil(S/N) full steps, step 0 first, strictly
    increasing, inside 0..S-1; or the clear refusal, which happens only at N = 2 around the middle step of
    S = 4m + 2 steps (k odd, so a pair of values straddles c, odd about it, and truncates to one)."""
    refused = 0
    for steps in range(1, 101):
        for interval in range(1, 11):
            k = math.ceil(steps / interval)
            for center in (0, steps // 4, steps // 2, (3 * steps) // 4, steps):
                try:
                    full = official_steps(steps, interval, center, 1.4)
                except ValueError as error:  # the odd-about-c merge shown above: at N = 2 and c = S/2 only
                    assert f"exactly {k} full steps among {steps}" in str(error)
                    assert (interval, center) == (2, steps // 2) and steps % 4 == 2
                    refused += 1
                    continue
                assert len(full) == k and full[0] == 0 and full[-1] < steps
                assert all(a < b for a, b in zip(full, full[1:], strict=False))
    assert refused == len(range(6, 101, 4))  # S = 6, 10, ..., 98 (S = 2 has k = 1)


@pytest.mark.parametrize(
    "args, message",
    [
        ((10, 2, 2.5, 1.4), r"center=2.5 must be a step index in 0\.\.10"),
        ((10, 2, 11, 1.4), r"center=11 must be a step index"),
        ((10, 2, -1, 1.4), r"center=-1 must be a step index"),
        ((10, 2, 5, 1.0), r"pow=1.0 must be > 1"),
        ((10, 0, 5, 1.4), r"interval=0 must be an int >= 1"),
        ((0, 2, 0, 1.4), r"at least one sampling step"),
    ],
)
def test_official_rule_bad_values(args, message):
    with pytest.raises(ValueError, match=message):
        official_steps(*args)


# ---------------------------------------------------------------- the official --branch


def test_our_branch_is_the_official_branch_number():
    """Evidence, from the official DDPM model (ddpm/models/deepcache_diffusion.py, Model.forward): --branch b
    caches the input of up block (L, B) with select_layer, select_block = b // 3, b % 3 and (L, B) =
    (select_layer + 1, 2) if select_block == 2 else (select_layer, 1 - select_block); its cached path runs the down
    blocks up to (select_layer, select_block) (2: through that level's downsample). Its README's MACs snippet feeds
    branch 2 a cached feature of shape [1, 256, 16, 16] on CIFAR-10."""
    with torch.device("meta"):
        model = UNet(**CIFAR10)
    for b in range(4 * 3 - 1):  # 4 levels, 2 blocks and a downsample each, none after the last level
        layer, block = b // 3, b % 3
        up = (layer + 1, 2) if block == 2 else (layer, 1 - block)
        assert DeepCache(model, interval=1, branch=b)._up == up
    x, t = torch.zeros(1, 3, 32, 32, device="meta"), torch.zeros(1, dtype=torch.int64, device="meta")
    assert DeepCache(model, interval=1, branch=2)._full(x, t)[1].shape == (1, 256, 16, 16)


def test_official_branch_2_runs_the_official_cached_path(hooked):
    """The official cached path at --branch 2, read off its code: down level 0 (both blocks and the downsample),
    up block 2 of level 1 on the cached feature and level 1's upsample, then all of up level 0."""
    model, ran, _ = hooked
    cache = DeepCache(model, [900, 800], interval=2, branch=2)
    with torch.no_grad():
        cache(noise(), 900)
        ran.clear()
        cache(noise(), 800)
    assert set(ran) == {
        ("down", 0, 0), ("down", 0, 1), ("down", 0, "resample"), ("up", 1, 2), ("up", 1, "resample"),
        ("up", 0, 0), ("up", 0, 1), ("up", 0, 2),
    }  # fmt: skip


# ---------------------------------------------------------------- no stale cache


def test_a_new_batch_never_reuses_the_last_batchs_features(unet):
    ts = timesteps.leading(5, SCHED.T)
    cache = DeepCache(unet, ts, interval=5)  # one full step, four cached ones
    sampling.ddim(cache, noise(1), SCHED, ts)
    second = sampling.ddim(cache, noise(2), SCHED, ts)  # no reset(): the first timestep starts a new trajectory
    assert torch.equal(second, sampling.ddim(DeepCache(unet, ts, interval=5), noise(2), SCHED, ts))
    assert cache.full_calls == 2


def test_reset_and_a_new_batch_size_force_a_full_call(unet):
    cache = DeepCache(unet, [900, 500, 100], interval=3)
    with torch.no_grad():
        cache(noise(), 900)
        cache(noise(), 500)
        assert (cache.full_calls, cache.shallow_calls) == (1, 1)
        cache.reset()
        cache(noise(), 500)
        assert cache.full_calls == 2
        assert torch.equal(cache(noise(3, batch=3), 100), unet(noise(3, batch=3), 100))
        assert cache.full_calls == 3


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"branch": 8}, r"branch=8 does not exist .* choose 0\.\.7"),
        ({"branch": -1}, r"branch=-1 does not exist"),
        ({"interval": 0}, r"interval=0 must be an int >= 1"),
        ({"interval": 2.5}, r"interval=2.5 must be an int >= 1"),
        ({"timesteps": [5, 7]}, r"strictly descending"),
        ({"schedule": "nonuniform", "center": 1.5}, r"center=1.5 must lie in \[0, 1\]"),
        ({"schedule": "nonuniform", "power": 0.5}, r"power=0.5 must be >= 1"),
        ({"schedule": "official", "power": 1.0}, r"power=1.0 must be > 1 for schedule=official"),
        ({"schedule": "quadratic"}, r"schedule='quadratic' is not a schedule .* \('uniform', 'nonuniform', 'offic"),
        ({"uniform": False}, r"uniform=False is replaced by schedule: .* schedule=nonuniform for uniform=false"),
        ({"uniform": True}, r"uniform=True is replaced by schedule: use schedule=uniform for uniform=true"),
        ({"schedule": "official", "interval": 2, "timesteps": [9, 8, 7, 6, 5, 4]}, r"finds no power in \(1, 1.4\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(unet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepCache(unet, **{"timesteps": [9, 5, 1], **kwargs})


def test_bad_calls_raise_clear_errors(unet):
    with pytest.raises(ValueError, match=r"needs the sampling timesteps"):
        DeepCache(unet, interval=2)(noise(), 10)
    with pytest.raises(ValueError, match=r"t=950 lies above the first planned timestep 900"):
        DeepCache(unet, [900, 10], interval=2)(noise(), 950)
    with pytest.raises(ValueError, match=r"one timestep per call"):
        DeepCache(unet, [900, 10], interval=2)(noise(), torch.tensor([900, 10]))
    with pytest.raises(ValueError, match=r"wraps a diffusion.unet.UNet"):
        DeepCache(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"one level, no branch after it: choose branch in 0\.\.0"):
        DeepCache(UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=32))


# ---------------------------------------------------------------- cost


def test_count_macs_agrees_with_torchs_flop_counter_plus_the_attention_products(unet):
    x, t = noise(), torch.tensor([3, 700])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t)
    dense_ops = {"aten.convolution", "aten.addmm", "aten.mm"}  # FLOPs = 2 MACs; attention is counted apart
    dense = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op) in dense_ops)
    attention = 2 * 2 * 8**4 * 64 * (2 + 3)  # level 1 (8x8 for 16x16 inputs, 64 channels): 2 down + 3 up, batch 2
    attention += 2 * 2 * 4**4 * 64  # the middle one at 4x4
    assert count_macs(unet, lambda: unet(x, t)) == dense // 2 + attention


def test_cached_cost_reproduces_the_papers_cifar10_macs_ratios():
    """The paper's MACs ratios for 100 DDIM steps at N = 2, 3, 5, 10 come back within 2% with the cached call
    running only the first resolution level (branch 1, the default; branch 2 also reruns a 16x16 up block)."""
    with torch.device("meta"):
        model = UNet(**CIFAR10)
    share = cached_cost(model)
    assert share == cached_cost(model, branch=1)
    for n, paper in [(2, 1.47), (3, 1.72), (5, 2.03), (10, 2.32)]:
        full = len(uniform_steps(100, n))
        assert macs_speedup(share, full, 100) == pytest.approx(paper, rel=0.02)
    assert cached_cost(model, branch=0) < share < cached_cost(model, branch=2) < cached_cost(model, branch=10) < 1


# ---------------------------------------------------------------- configs


def test_cache_configs_compose(unet, tmp_path):
    assert not compose_config("sample", [], tmp_path).cache  # cache=none: no wrapper
    cfg = compose_config("sample", ["cache=deepcache"], tmp_path)
    cache = instantiate(cfg.cache)(unet, timesteps=timesteps.leading(10, SCHED.T))
    assert (
        isinstance(cache, DeepCache) and cache.interval == 3 and cache.branch == 1 and cache.full_steps == [0, 3, 6, 9]
    )
    cfg = compose_config("sample", ["cache=deepcache", "cache.schedule=nonuniform"], tmp_path)
    cache = instantiate(cfg.cache)(unet, timesteps=timesteps.leading(30, SCHED.T))
    assert cache.full_steps == nonuniform_steps(30, 3, 0.5, 1.4)
    overrides = ["cache=deepcache", "cache.schedule=official", "cache.center=0.4", "cache.interval=5"]
    cache = instantiate(compose_config("sample", overrides, tmp_path).cache)(unet, timesteps=range(999, 0, -10))
    assert cache.full_steps == official_steps(100, 5, 40, 1.4)  # the official --center 40 --pow 1.4
    old = compose_config("sample", ["cache=deepcache", "cache.uniform=false"], tmp_path)  # an old command line
    with pytest.raises(ValueError, match=r"uniform=False is replaced by schedule: .*schedule=nonuniform"):
        instantiate(old.cache)(unet, timesteps=timesteps.leading(30, SCHED.T))
