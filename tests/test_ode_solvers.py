"""FON and PF, the PNDM table's two ODE rows, against closed forms: on one Gaussian the probability-flow ODE keeps
z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so both samplers' endpoints are known exactly; on a
mixture FON's error against a tight PF run from the same x_T falls at fourth order; PF's endpoint moves by less than
its tolerance between two tolerances; both compose with prediction targets and DeepCache; bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.mixture_testbed import image_mixture
from diffusion import sampling, timesteps
from diffusion import schedule as S
from diffusion.mixture import GaussianMixture
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import DeepCache
from diffusion.wrappers.prediction import Prediction

from .test_unet import perturbed

pytestmark = pytest.mark.usefixtures("one_thread")

STD = 0.3
MU = torch.linspace(-0.8, 0.8, 2 * 4 * 4, dtype=torch.float64).view(1, 2, 4, 4)
GAUSSIAN = GaussianMixture(MU, torch.ones(1), STD)
MIXTURE = image_mixture(image_size=4, channels=3)


def x_T(n: int = 16, shape=(2, 4, 4), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gaussian_flow(x: torch.Tensor, sched: S.Schedule, start: int, end: int) -> torch.Tensor:
    """The exact sampler output: the ODE from t = start to t = end (z fixed), then E[x0 | x_end]."""
    a0, a1 = float(sched.alphas_cumprod[start]), float(sched.alphas_cumprod[end])
    z = (x - a0**0.5 * MU) / (a0 * STD**2 + 1 - a0) ** 0.5
    x_end = a1**0.5 * MU + (a1 * STD**2 + 1 - a1) ** 0.5 * z
    return MU + a1**0.5 * STD**2 / (a1 * STD**2 + 1 - a1) * (x_end - a1**0.5 * MU)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


class Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.model(x, t)


# ---------------------------------------------------------------- one Gaussian: the exact solution


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_pf_lands_on_the_gaussians_exact_endpoint(name):
    sched = getattr(S, name)()
    x = x_T()
    for tol, bound in ((1e-5, 2e-5), (1e-8, 2e-8)):
        out = sampling.pf(GAUSSIAN.model(sched), x, sched, timesteps.trailing(10, 1000), rtol=tol, atol=tol)
        assert rms(out, gaussian_flow(x, sched, 999, 0)) < bound, (name, tol)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_fon_converges_to_the_gaussians_exact_endpoint_and_counts_four_calls_a_step(name):
    sched = getattr(S, name)()
    x, errors = x_T(), []
    for steps in (20, 40, 80):
        ts = timesteps.leading(steps, 1000)
        model = Counted(GAUSSIAN.model(sched))
        errors.append(rms(sampling.fon(model, x, sched, ts), gaussian_flow(x, sched, int(ts[0]), 0)))
        assert model.calls == 4 * (steps - 1) + 1
    assert errors[-1] < 1e-4 and errors[0] > errors[1] > errors[2], errors


def test_one_fon_step_is_ddims():
    sched, x = S.linear(), x_T()
    ts = torch.tensor([999])
    model = GAUSSIAN.model(sched)
    torch.testing.assert_close(sampling.fon(model, x, sched, ts), sampling.ddim(model, x, sched, ts), rtol=0, atol=0)


# ---------------------------------------------------------------- a mixture: fourth order, tolerance


@pytest.fixture(scope="module")
def mixture_reference():
    sched = S.linear()
    x = x_T(16, MIXTURE.shape, seed=1)
    ts = timesteps.linspace(10, 1000)  # 999 .. 0: PF and FON share both ends
    return sched, x, sampling.pf(MIXTURE.model(sched), x, sched, ts, rtol=1e-10, atol=1e-10)


def test_fon_error_falls_at_fourth_order_against_a_tight_pf_run(mixture_reference):
    sched, x, exact = mixture_reference
    errors = [rms(sampling.fon(MIXTURE.model(sched), x, sched, timesteps.linspace(s, 1000)), exact)
              for s in (40, 80, 160)]  # fmt: skip
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(order > 3.5 for order in orders), (errors, orders)


def test_pf_endpoint_moves_less_than_its_tolerance_between_two_tolerances(mixture_reference):
    sched, x, exact = mixture_reference
    model = MIXTURE.model(sched)
    counts, ends = [], []
    for tol in (1e-3, 1e-4, 1e-6):
        counted = Counted(model)
        ends.append(sampling.pf(counted, x, sched, timesteps.trailing(1, 1000), rtol=tol, atol=tol))
        counts.append(counted.calls)
    assert rms(ends[1], ends[2]) < 1e-4 and rms(ends[0], ends[2]) < 1e-3
    assert rms(ends[2], exact) < 1e-6
    assert counts[0] < counts[1] < counts[2], counts  # a tighter tolerance takes more steps


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("sampler", ["fon", "pf"])
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_an_x0_or_v_network_samples_as_the_exact_eps_network(sampler, prediction):
    sched, x = S.cosine(), x_T(8, MIXTURE.shape)
    ts = timesteps.trailing(8, 1000)
    run = getattr(sampling, sampler)
    expected = run(MIXTURE.model(sched), x, sched, ts)
    got = run(Prediction(MIXTURE.predictor(sched, prediction), sched, prediction), x, sched, ts)
    assert rms(got, expected) < 1e-9 * expected.abs().max().item()


@pytest.fixture(scope="module")
def unet() -> UNet:
    return perturbed(UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16)).eval()


def test_fon_under_deepcache_is_full_once_per_full_step_and_exact_at_interval_one(unet):
    sched = S.linear()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ts = timesteps.leading(5, 1000)
    torch.testing.assert_close(sampling.fon(DeepCache(unet, ts, interval=1), x, sched, ts),
                               sampling.fon(unet, x, sched, ts), rtol=0, atol=0)  # fmt: skip
    cache = DeepCache(unet, ts, interval=2)  # full steps: indices 0, 2, 4 of the 5 timesteps
    sampling.fon(cache, x, sched, ts)
    # each full-step timestep once, at its first call (the float midpoints never are): 800 at the start, 400 and 0
    # at the fourth stage of the interval that ends there
    assert (cache.full_calls, cache.shallow_calls) == (3, 4 * 4 + 1 - 3)


def test_pf_under_deepcache_counts_calls(unet):
    sched = S.linear()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ts = timesteps.trailing(1, 1000)
    plain = Counted(unet)
    expected = sampling.pf(plain, x, sched, ts, rtol=1e-3, atol=1e-3)
    exact = DeepCache(unet, ts, interval=1, count="calls")
    torch.testing.assert_close(sampling.pf(exact, x, sched, ts, rtol=1e-3, atol=1e-3), expected, rtol=0, atol=0)
    cache = DeepCache(unet, ts, interval=3, count="calls")
    sampling.pf(cache, x, sched, ts, rtol=1e-3, atol=1e-3)
    calls = cache.full_calls + cache.shallow_calls
    assert cache.full_calls == math.ceil(calls / 3) and calls > 10
    with pytest.raises(ValueError, match="schedule=nonuniform places full steps by the number of steps"):
        DeepCache(unet, ts, interval=3, count="calls", schedule="nonuniform")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("sampler", ["fon", "pf"])
def test_a_zero_terminal_snr_start_is_refused(sampler):
    sched = S.linear(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR .* use sampler=ddim, ddpm, dpm_solver or unipc"):
        getattr(sampling, sampler)(GAUSSIAN.model(sched), x_T(), sched, timesteps.trailing(5, 1000))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rtol": 0}, r"rtol=0 must be a number in \(0, 1\)"),
        ({"atol": "1e-5"}, r"atol='1e-5' must be a number"),
        ({"rtol": True}, r"rtol=True must be a number"),
        ({"method": "BDF"}, r"method='BDF': choose one of RK45, RK23, DOP853"),
    ],
)
def test_bad_pf_options_are_refused(options, message):
    sched = S.linear()
    with pytest.raises(ValueError, match=message):
        sampling.pf(GAUSSIAN.model(sched), x_T(), sched, timesteps.trailing(1, 1000), **options)
