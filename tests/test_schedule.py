"""Schedules against their formulas; the forward process and posterior against independent derivations."""

import math

import pytest
import torch

from diffusion import schedule as S


def test_linear_matches_ho_et_al():
    sched = S.linear(1000)
    assert sched.T == 1000 and sched.betas.dtype == torch.float64
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0))
    # alpha_bar_T of the DDPM linear schedule is about 4e-5: x_T is almost pure noise
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_cosine_follows_its_alpha_bar_until_clipping():
    T, s = 1000, 0.008
    sched = S.cosine(T, s=s)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in [0, 1, 10, 500, 900]:
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() == pytest.approx(0.999)  # the last betas are clipped
    assert bool((sched.betas > 0).all())


def test_quadratic_and_sigmoid():
    quad = S.quadratic(100, 1e-4, 0.02)
    assert torch.allclose(quad.betas.sqrt(), torch.linspace(0.01, math.sqrt(0.02), 100, dtype=torch.float64))
    sig = S.sigmoid(100, 1e-4, 0.02)
    assert bool((sig.betas[1:] > sig.betas[:-1]).all())  # monotone
    mid = torch.sigmoid(torch.tensor(0.0)).item() * (0.02 - 1e-4) + 1e-4
    assert sig.betas[49:51].mean().item() == pytest.approx(mid, rel=1e-2)


@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
def test_every_schedule_is_a_valid_diffusion(name):
    sched = S.SCHEDULES[name](T=50)
    abar = sched.alphas_cumprod
    assert sched.T == 50 and bool((abar[1:] < abar[:-1]).all()) and 0 < abar[-1] < abar[0] < 1


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="T must be an integer"):
        S.linear(T=1)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        S.Schedule(torch.tensor([0.1, 1.5]))


def test_q_sample_statistics():
    sched = S.linear(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = sched.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_predict_x0_and_eps_invert_q_sample():
    sched = S.cosine(1000)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 990])
    xt = sched.q_sample(x0, t, eps)
    assert torch.allclose(sched.predict_x0(xt, t, eps), x0, atol=1e-4)
    assert torch.allclose(sched.predict_eps(xt, t, x0), eps, atol=1e-4)


@pytest.mark.parametrize("t,s", [(500, 499), (500, 400), (10, -1), (999, 0)])
def test_posterior_is_the_gaussian_conditional(t, s):
    """q(x_s | x_t, x0) from the joint Gaussian of (x_s, x_t) given x0, not from the formula under test."""
    sched = S.linear(1000)
    abar_s = 1.0 if s < 0 else sched.alphas_cumprod[s].item()
    abar_t = sched.alphas_cumprod[t].item()
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.5]], dtype=torch.float64)
    var_s, var_t = 1 - abar_s, 1 - abar_t
    cov = math.sqrt(abar_t / abar_s) * var_s  # x_t = sqrt(abar_t / abar_s) x_s + noise
    expected_mean = math.sqrt(abar_s) * 0.3 + cov / var_t * (-0.5 - math.sqrt(abar_t) * 0.3)
    expected_var = var_s - cov**2 / var_t
    mean, var = sched.posterior(x0, xt, torch.tensor([t]), torch.tensor([s]))
    assert mean.item() == pytest.approx(expected_mean, rel=1e-9, abs=1e-12)
    assert var.item() == pytest.approx(expected_var, rel=1e-9, abs=1e-15)
    if s == t - 1:  # Ho et al.'s beta-tilde
        beta = sched.betas[t].item()
        assert var.item() == pytest.approx(beta * (1 - abar_s) / (1 - abar_t), rel=1e-9)
