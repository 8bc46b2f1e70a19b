"""Samplers against closed forms: with a Gaussian or Gaussian-mixture data distribution the exact noise predictor
is known (diffusion.mixture), so a sampler's output can be checked against the data, against Ho et al.'s
Algorithm 2, against the exact probability-flow ODE solution, and against diffusers' reference schedulers."""

import inspect
import math
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from diffusion import sampling, schedule, timesteps
from diffusion.mixture import GaussianMixture

from .conftest import CONF

F64 = torch.float64
SAMPLERS = {
    "ddpm": sampling.ddpm,
    "ddpm_beta": partial(sampling.ddpm, variance="beta"),
    "ddim": sampling.ddim,
    "ddim_eta1": partial(sampling.ddim, eta=1.0),
    "pndm": sampling.pndm,
    "s_pndm": sampling.s_pndm,
    "plms": sampling.plms,
    "dpm_solver": sampling.dpm_solver,
    "dpm_solver_3m": sampling.dpm_solver_3m,  # these two: tests/test_solvers.py
    "unipc": sampling.unipc,
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(dim: int = 8, std: float = 0.3) -> GaussianMixture:
    return GaussianMixture(torch.linspace(-0.5, 0.8, dim, dtype=F64)[None], torch.ones(1), std)


def separated_modes(dim: int = 16) -> GaussianMixture:
    """Four well-separated modes (pairwise distance about 2.3, std 0.15) with unequal weights."""
    means = torch.randn(4, dim, generator=gen(0), dtype=F64)
    return GaussianMixture(1.6 * means / means.norm(dim=1, keepdim=True), torch.tensor([0.4, 0.3, 0.2, 0.1]), 0.15)


def ode_x0(x: torch.Tensor, t: int, data: GaussianMixture, sched: schedule.Schedule) -> torch.Tensor:
    """The exact probability-flow ODE solution from x at timestep t to clean data, for Gaussian data N(m, s^2 I).

    The ODE is linear in x and carries N(sqrt(abar) m, v I), v = abar s^2 + 1 - abar, to N(m, s^2 I) with a positive
    isotropic Jacobian, so each point keeps its standardised position: x0 = m + s (x - sqrt(abar) m) / sqrt(v)."""
    m, s, abar = data.means[0], float(data.std[0]), float(sched.alphas_cumprod[t])
    return m + s * (x - abar**0.5 * m) / (abar * s**2 + 1 - abar) ** 0.5


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


# -------------------------------------------------------------------- exactness on a single point
@pytest.mark.parametrize("steps", [1, 4, 9])
@pytest.mark.parametrize("spacing", timesteps.NAMES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_returns_the_point_of_a_one_point_distribution(name, spacing, steps):
    sched = schedule.linear(1000)
    x_star = torch.linspace(-0.9, 0.9, 3 * 4 * 4, dtype=F64).view(1, 3, 4, 4)
    model = GaussianMixture(x_star, torch.ones(1), 0.0).model(sched)  # eps = (x - sqrt(abar) x*) / sqrt(1 - abar)
    noise = torch.randn(5, 3, 4, 4, dtype=F64, generator=gen(0))
    x0 = SAMPLERS[name](model, noise, sched, timesteps.make(spacing, steps, sched), generator=gen(1), clip=False)
    assert torch.allclose(x0, x_star.expand_as(x0), atol=1e-8, rtol=0)


# -------------------------------------------------------------------- clipping: each paper's code's default
CLIPS_BY_DEFAULT = {
    "ddpm": True,
    **{n: False for n in ("ddim", "pndm", "s_pndm", "plms", "dpm_solver", "dpm_solver_3m", "unipc")},
}


@pytest.mark.parametrize("name", CLIPS_BY_DEFAULT)
def test_clip_defaults_follow_the_papers_code_in_the_function_and_its_config(name):
    """DDPM's code clips x0 (p_sample's clip_denoised); DDIM's, PNDM's, DPM-Solver++'s and UniPC's do not."""
    sampler = getattr(sampling, name)
    assert inspect.signature(sampler).parameters["clip"].default is CLIPS_BY_DEFAULT[name]
    assert OmegaConf.load(CONF / "sampler" / f"{name}.yaml").clip is CLIPS_BY_DEFAULT[name]
    sched = schedule.linear(100)
    model = GaussianMixture(torch.full((1, 2), 3.0, dtype=F64), torch.ones(1), 0.0).model(sched)  # data at 3
    out = sampler(model, torch.randn(4, 2, dtype=F64, generator=gen(0)), sched, timesteps.leading(10, 100))
    expected = torch.ones_like(out) if CLIPS_BY_DEFAULT[name] else torch.full_like(out, 3.0)
    assert torch.allclose(out, expected, atol=1e-8), name


# -------------------------------------------------------------------- DDPM
def ddpm_variance_closed_form(sched: schedule.Schedule, data_std: float, variance: str) -> float:
    """Var of DDPM's output per dimension for data N(m, s^2 I), exact eps and x_T ~ N(0, I), from Ho et al. eq. 11:
    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, with eps linear in x_t."""
    abar, betas, var = sched.alphas_cumprod.tolist(), sched.betas.tolist(), 1.0
    for t in reversed(range(sched.T)):
        v = abar[t] * data_std**2 + 1 - abar[t]  # eps = sqrt(1 - abar) (x - sqrt(abar) m) / v
        gain = (1 - betas[t] / v) / (1 - betas[t]) ** 0.5
        sigma2 = 0.0 if t == 0 else betas[t] * (1 if variance == "beta" else (1 - abar[t - 1]) / (1 - abar[t]))
        var = gain**2 * var + sigma2
    return var


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_with_all_steps_reproduces_a_gaussian(variance):
    sched = schedule.linear(200, beta_start=5e-4, beta_end=0.1)  # T = 1000's betas scaled by 1000 / T
    data, n = gaussian(dim=8, std=0.5), 4000
    x = torch.randn(n, 8, dtype=F64, generator=gen(0))
    out = sampling.ddpm(
        data.model(sched), x, sched, timesteps.leading(200, 200), generator=gen(1), variance=variance, clip=False
    )
    assert float((out.mean(0) - data.means[0]).abs().max()) < 5 * 0.5 / n**0.5
    expected = ddpm_variance_closed_form(sched, 0.5, variance)
    assert abs(float(out.var(0).mean()) / expected - 1) < 0.04  # 5 standard errors
    assert abs(expected / 0.5**2 - 1) < 0.08  # at T = 200 the chain is 7% (posterior) / 2% (beta) off the data


def test_ddpm_with_all_steps_finds_the_modes_of_a_mixture():
    sched = schedule.linear(200, beta_start=5e-4, beta_end=0.1)
    means = torch.tensor([[2.0, 0, 0, 0], [-2, 1, 0, 0], [0, -2, 1, 1]], dtype=F64)
    data = GaussianMixture(means, torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.25]))
    x = torch.randn(4000, 4, dtype=F64, generator=gen(0))
    out = sampling.ddpm(data.model(sched), x, sched, timesteps.leading(200, 200), generator=gen(1), clip=False)
    assert data.mode_weight_error(out) < 0.03  # uniform weights would be 0.17 off
    assert data.frechet(out) < 0.02


def ho_algorithm_2(model, x, sched, ts, generator, variance):
    """Ho et al. Algorithm 2 on the respaced process (Nichol & Dhariwal sec. 4): the kept alphas_cumprod define new
    betas 1 - abar_t / abar_s, and the model still sees the original timesteps."""
    kept = ts.flip(0)  # ascending
    new = schedule.Schedule(
        1 - sched.alphas_cumprod[kept] / torch.cat([torch.ones(1, dtype=F64), sched.alphas_cumprod[kept[:-1]]])
    )
    for i in reversed(range(len(kept))):
        beta, abar = float(new.betas[i]), float(new.alphas_cumprod[i])
        eps = model(x, torch.full((len(x),), int(kept[i])))
        x = (x - beta / (1 - abar) ** 0.5 * eps) / (1 - beta) ** 0.5
        if i > 0:
            sigma2 = beta if variance == "beta" else beta * (1 - float(new.alphas_cumprod[i - 1])) / (1 - abar)
            x = x + sigma2**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


@pytest.mark.parametrize("steps", [100, 10])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_and_ddim_eta1_follow_ho_et_al_algorithm_2(steps, variance):
    sched = schedule.cosine(100)
    data = separated_modes(dim=6)
    x = torch.randn(8, 6, dtype=F64, generator=gen(0))
    ts = timesteps.leading(steps, sched.T)
    reference = ho_algorithm_2(data.model(sched), x, sched, ts, gen(1), variance)
    ours = sampling.ddpm(data.model(sched), x, sched, ts, generator=gen(1), variance=variance, clip=False)
    assert torch.allclose(ours, reference, atol=1e-9, rtol=0)
    if variance == "posterior":  # the posterior variance is DDIM's eta = 1 between the visited steps
        ddim = sampling.ddim(data.model(sched), x, sched, ts, generator=gen(1), eta=1.0, clip=False)
        assert torch.allclose(ddim, reference, atol=1e-9, rtol=0)


# -------------------------------------------------------------------- DDIM and the probability-flow ODE
def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    sched = schedule.cosine(100)
    model = separated_modes(dim=4).model(sched)
    noise = torch.randn(3, 4, dtype=F64, generator=gen(0))
    ts = timesteps.leading(10, sched.T)

    def run(eta, seed):
        return sampling.ddim(model, noise, sched, ts, eta=eta, generator=gen(seed), clip=False)

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))


def test_ddim_eta0_converges_to_the_probability_flow_ode_at_first_order():
    sched, data = schedule.linear(1000), gaussian()
    x = torch.randn(64, 8, dtype=F64, generator=gen(0))
    errors = {}
    for steps in (10, 100, 1000):
        ts = timesteps.linspace(steps, sched.T)  # all start at t = T-1
        errors[steps] = rms(sampling.ddim(data.model(sched), x, sched, ts, clip=False), ode_x0(x, 999, data, sched))
    assert errors[1000] < errors[100] / 5 < errors[10] / 25, errors  # about 1/steps: first order
    assert errors[1000] < 2e-3, errors


# -------------------------------------------------------------------- higher order: PNDM and DPM-Solver++
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("sched", [schedule.linear(1000), schedule.cosine(1000)], ids=str)
def test_higher_order_samplers_beat_ddim_on_the_exact_ode(sched, steps):
    data = gaussian()
    x = torch.randn(256, 8, dtype=F64, generator=gen(0))

    def error(name, spacing):
        ts = timesteps.make(spacing, steps, sched)
        return rms(SAMPLERS[name](data.model(sched), x, sched, ts, clip=False), ode_x0(x, int(ts[0]), data, sched))

    ddim = error("ddim", "leading")  # PNDM on the paper's (leading) steps, DPM-Solver++ on its log-SNR steps
    assert error("pndm", "leading") < 0.4 * ddim
    assert error("plms", "leading") < 0.4 * ddim
    assert error("s_pndm", "leading") < 0.75 * ddim
    assert error("dpm_solver", "logsnr") < 0.25 * error("ddim", "logsnr")


def test_dpm_solver_on_logsnr_steps_beats_ddim_on_well_separated_modes():
    sched, data = schedule.linear(1000), separated_modes()
    x = torch.randn(2000, 16, dtype=F64, generator=gen(1))

    def frechet(name, spacing):
        return data.frechet(SAMPLERS[name](data.model(sched), x, sched, timesteps.make(spacing, 10, sched), clip=False))

    best_ddim = min(frechet("ddim", "leading"), frechet("ddim", "logsnr"))
    assert frechet("dpm_solver", "logsnr") < 0.3 * best_ddim


@pytest.mark.parametrize("steps", [4, 10])
def test_pndm_plms_and_dpm_solver_match_diffusers(steps):
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler

    sched, data = schedule.linear(1000), separated_modes(dim=6)
    model, x = data.model(sched), torch.randn(16, 6, dtype=F64, generator=gen(0))

    def run(scheduler):
        y = x.clone()
        for t in scheduler.timesteps.tolist():
            y = scheduler.step(model(y, torch.full((len(y),), t)), t, y).prev_sample
        return y

    for ours, skip_prk in ((sampling.pndm, False), (sampling.plms, True)):
        reference = PNDMScheduler(trained_betas=sched.betas.numpy(), skip_prk_steps=skip_prk, set_alpha_to_one=True)
        reference.set_timesteps(steps)  # leading spacing, the same midpoints t - delta // 2
        got = ours(model, x, sched, timesteps.leading(steps, sched.T), clip=False)
        assert torch.allclose(got, run(reference), atol=1e-4, rtol=0)  # diffusers keeps alphas in float32
        assert not torch.allclose(got, sampling.ddim(model, x, sched, timesteps.leading(steps, sched.T), clip=False))
    ts = timesteps.logsnr(steps, sched)
    reference = DPMSolverMultistepScheduler(trained_betas=sched.betas.numpy(), solver_order=2, final_sigmas_type="zero")
    reference.set_timesteps(timesteps=ts.tolist())
    assert torch.allclose(sampling.dpm_solver(model, x, sched, ts, clip=False), run(reference), atol=1e-4, rtol=0)


# -------------------------------------------------------------------- model evaluations (NFE)
def expected_nfe(name: str, steps: int) -> int:
    if name == "pndm":  # three Runge-Kutta steps of 4 calls, never on the final step
        return steps + 9 if steps >= 4 else 4 * steps - 3
    if name in ("s_pndm", "plms"):  # one improved-Euler step of 2 calls, never on the final step
        return steps + 1 if steps >= 2 else 1
    return steps


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_calls_the_model_the_documented_number_of_times_at_valid_timesteps(name):
    sched = schedule.linear(50)
    data = separated_modes(dim=4)

    def model(x, t):
        assert t.dtype == torch.int64 and t.shape == (len(x),) and bool((t == t[0]).all())
        assert 0 <= int(t[0]) <= sched.T - 1
        calls.append(int(t[0]))
        return data.eps(x, t, sched)

    for steps in (1, 2, 3, 4, 5, 10):
        calls = []
        ts = timesteps.linspace(steps, sched.T)
        SAMPLERS[name](model, torch.randn(2, 4, dtype=F64, generator=gen(0)), sched, ts, generator=gen(1), clip=False)
        assert len(calls) == expected_nfe(name, steps), (steps, calls)
        assert set(ts.tolist()) <= set(calls)


def test_stochastic_samplers_draw_from_any_noise_source():
    """A generator may be any object with randn(shape, *, device, dtype), e.g. one stream per image."""

    class Rows:
        def __init__(self, seed):
            self.g = gen(seed)

        def randn(self, shape, *, device, dtype):
            return torch.randn(shape, generator=self.g, dtype=dtype).to(device)

    sched, data = schedule.linear(100), separated_modes(dim=4)
    x, ts = torch.randn(3, 4, dtype=F64, generator=gen(0)), timesteps.leading(10, 100)
    for sampler in (sampling.ddpm, partial(sampling.ddim, eta=0.5)):
        expected = sampler(data.model(sched), x, sched, ts, generator=gen(1), clip=False)
        assert torch.equal(sampler(data.model(sched), x, sched, ts, generator=Rows(1), clip=False), expected)
    assert sampling.randn_like(x, Rows(2)).shape == x.shape


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", SAMPLERS)
def test_bad_timesteps_are_rejected_with_a_clear_message(name):
    sched = schedule.linear(100)
    model, x = gaussian(dim=2).model(sched), torch.randn(2, 2, dtype=F64)
    bad = {
        "strictly descending": [torch.tensor([10, 20, 30]), torch.tensor([30, 30, 10])],
        r"lie in \[0, T-1\] = \[0, 99\]": [torch.tensor([100, 50]), torch.tensor([50, -1])],
        "non-empty 1-D": [torch.tensor([], dtype=torch.int64), torch.tensor([[50, 10]])],
        "must be integers": [torch.tensor([50.0, 10.0])],
    }
    for message, cases in bad.items():
        for ts in cases:
            with pytest.raises(ValueError, match=message):
                SAMPLERS[name](model, x, sched, ts)


def test_bad_options_are_rejected():
    sched = schedule.linear(100)
    model, x, ts = gaussian(dim=2).model(sched), torch.randn(2, 2, dtype=F64), timesteps.leading(5, 100)
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
            sampling.ddim(model, x, sched, ts, eta=eta)
    with pytest.raises(ValueError, match="variance must be 'posterior'"):
        sampling.ddpm(model, x, sched, ts, variance="learned")


# -------------------------------------------------------------------- the closed-form data distribution
def test_mixture_eps_is_the_exact_noise_prediction():
    """E[eps | x_t] = -sqrt(1 - abar) grad log p_t(x_t) (Tweedie), p_t built independently by torch.distributions."""
    sched = schedule.cosine(100)
    means = torch.randn(3, 2, 2, 2, generator=gen(0), dtype=F64)  # [K, C, H, W]
    weights, std = torch.tensor([0.2, 0.5, 0.3], dtype=F64), torch.tensor([0.1, 0.4, 0.0], dtype=F64)
    data = GaussianMixture(means, weights, std)
    t = torch.tensor([0, 10, 50, 99, 99])
    x = torch.randn(5, 2, 2, 2, generator=gen(1), dtype=F64).requires_grad_()
    abar = sched.alphas_cumprod[t].view(-1, 1)
    scale = (abar * std**2 + 1 - abar).sqrt()  # [B, K]
    components = torch.distributions.Independent(
        torch.distributions.Normal(abar.sqrt()[..., None] * means.view(1, 3, -1), scale[..., None]), 1
    )
    p_t = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights.expand(5, 3)), components)
    (score,) = torch.autograd.grad(p_t.log_prob(x.view(5, -1)).sum(), x)
    expected = -(1 - abar).sqrt().view(-1, 1, 1, 1) * score
    assert torch.allclose(data.eps(x.detach(), t, sched), expected, atol=1e-10, rtol=1e-10)
    assert data.eps(x.detach().float(), t, sched).dtype == torch.float32


def test_mixture_samples_moments_and_mode_weights():
    means = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]], dtype=F64)
    data = GaussianMixture(means, torch.tensor([3.0, 1.0]), torch.tensor([0.3, 0.5]))  # weights normalised
    assert torch.allclose(data.weights, torch.tensor([0.75, 0.25], dtype=F64))
    mean, cov = data.moments()
    # closed form: cov = sum_k w_k (s_k^2 I + mu_k mu_k^T) - mean mean^T
    d = means[0] - means[1]
    assert torch.allclose(cov, (0.75 * 0.09 + 0.25 * 0.25) * torch.eye(3, dtype=F64) + 0.75 * 0.25 * torch.outer(d, d))
    x = data.sample(20000, gen(0))
    assert torch.allclose(x.mean(0), mean, atol=0.03) and torch.allclose(torch.cov(x.T), cov, atol=0.05)
    assert data.mode_weight_error(x) < 0.01 and data.frechet(x) < 0.01
    assert data.mode_weight_error(means[:1].expand(10, 3)) == pytest.approx(0.25)  # all in mode 0: off by w_1


def test_mixture_frechet_against_the_closed_form_between_isotropic_gaussians():
    """Samples whitened to mean m' and covariance s'^2 I exactly: the distance to N(m, s^2 I) is
    ||m - m'||^2 + D (s - s')^2."""
    data = gaussian(dim=4, std=0.5)
    z = torch.randn(500, 4, generator=gen(0), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # empirical covariance exactly I
    shift = torch.tensor([0.3, 0.0, -0.4, 0.0], dtype=F64)
    expected = 0.25 + 4 * (0.5 - 0.8) ** 2
    assert data.frechet(data.means[0] + shift + 0.8 * z) == pytest.approx(expected, abs=1e-9)
    assert data.frechet((data.means[0] + 0.5 * z).view(500, 1, 2, 2)) == pytest.approx(0, abs=1e-9)


def test_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture(torch.zeros(3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="weights must be 2 non-negative"):
        GaussianMixture(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="std must be one number or 2"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="std must be >= 0"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2), -1.0)
    assert math.isfinite(GaussianMixture(torch.zeros(2, 3), torch.ones(2), 0.0).frechet(torch.zeros(4, 3)))
