"""Editing and inverse problems against closed forms: the operators, the exact posterior of a Gaussian mixture given
y = A x (+ noise), and DDNM with the exact predictor.

- Each operator is linear, A A+ = I, and A+ A is a projection; its dense matrix is the operator.
- The exact posterior: noiseless samples satisfy A x = y; an empty mask gives back the prior; with noise, its mean
  matches importance sampling from the prior weighted by the likelihood.
- DDNM: A(x0) = y exactly (noiseless), observed pixels kept; its samples land on the posterior's components.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.mixture_testbed import image_mixture
from diffusion import operators as O
from diffusion import schedule as S
from diffusion import timesteps
from diffusion.sampling.ddnm import ddnm

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = image_mixture(image_size=4, channels=3, num_modes=3, std=0.2)
OPERATORS = {"box": O.Inpaint(O.box_mask(4)), "half": O.Inpaint(O.half_mask(4)),
             "random": O.Inpaint(O.random_mask(4, 0.5)), "superres 2x": O.SuperRes(2),
             "colorize": O.Colorize()}  # fmt: skip


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", OPERATORS)
def test_each_operator_is_linear_with_its_pseudo_inverse(name):
    op = OPERATORS[name]
    x = torch.randn(5, *DATA.shape, generator=gen(0), dtype=torch.float64)
    y = op.A(x)
    torch.testing.assert_close(op.A(op.pinv(y)), y, rtol=0, atol=1e-12)  # A A+ = I
    P = op.pinv(op.A(x))
    torch.testing.assert_close(op.pinv(op.A(P)), P, rtol=0, atol=1e-12)  # A+ A is a projection
    A = O.matrix(op, DATA.shape)
    torch.testing.assert_close(A @ x[0].reshape(-1), y[0].reshape(-1), rtol=0, atol=1e-12)
    nonzero = torch.linalg.svdvals(A)
    nonzero = nonzero[nonzero > 1e-9]
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, op.singular), rtol=0, atol=1e-12)
    torch.testing.assert_close(op.A(2 * x - y.new_ones(()).expand_as(x)), 2 * y - op.A(torch.ones_like(x)))


def test_bad_operator_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="factor=3 does not divide the image's 4x4 pixels"):
        O.SuperRes(3).A(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="the mask is \\(8, 8\\) pixels and the image \\(4, 4\\)"):
        O.Inpaint(O.box_mask(8)).A(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="colorization needs colour images"):
        O.Colorize().A(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="0 \\(missing\\) and 1 \\(observed\\) only"):
        O.Inpaint(torch.full((1, 4, 4), 0.5))


@pytest.mark.parametrize("name", OPERATORS)
def test_the_noiseless_posterior_lies_on_the_observation(name):
    op, x_star = OPERATORS[name], DATA.sample(1, gen(1))
    post = DATA.posterior(O.matrix(op, DATA.shape), op.A(x_star).reshape(-1))
    samples = post.sample(200, gen(2)).reshape(200, *DATA.shape)
    wanted = op.A(x_star).expand(200, *op.A(x_star).shape[1:])
    torch.testing.assert_close(op.A(samples), wanted, rtol=0, atol=1e-7)  # eigh's rounding on the null space
    assert float(post.weights[DATA.nearest_mode(x_star)[0]]) > 0.2  # the true component is a likely one


def test_an_empty_mask_gives_back_the_prior():
    op = O.Inpaint(torch.zeros(1, 4, 4))
    post = DATA.posterior(O.matrix(op, DATA.shape), torch.zeros(48))
    torch.testing.assert_close(post.weights, DATA.weights, rtol=0, atol=1e-12)
    mean, cov = post.moments()
    prior_mean, prior_cov = DATA.moments()
    torch.testing.assert_close(mean, prior_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(cov, prior_cov, rtol=0, atol=1e-12)


def test_the_noisy_posterior_mean_matches_importance_sampling_from_the_prior():
    op, sigma_y = O.SuperRes(2), 0.3
    x_star = DATA.sample(1, gen(3))
    y = op.A(x_star) + sigma_y * torch.randn(op.A(x_star).shape, generator=gen(4), dtype=torch.float64)
    post = DATA.posterior(O.matrix(op, DATA.shape), y.reshape(-1), sigma_y)
    prior = DATA.sample(400_000, gen(5))
    log_like = -((op.A(prior) - y) ** 2).flatten(1).sum(1) / (2 * sigma_y**2)
    w = (log_like - log_like.max()).exp()
    estimate = (w[:, None] * prior.flatten(1)).sum(0) / w.sum()
    assert float(w.sum() ** 2 / (w**2).sum()) > 2000  # enough effective samples for the check below
    torch.testing.assert_close(estimate, post.moments()[0], rtol=0, atol=0.02)
    modes = torch.bincount(DATA.nearest_mode(prior), weights=w, minlength=3) / w.sum()
    torch.testing.assert_close(modes, post.weights, rtol=0, atol=0.02)


# ---------------------------------------------------------------- DDNM with the exact predictor


@pytest.mark.parametrize("name", OPERATORS)
def test_ddnm_keeps_the_observation_exactly_and_finds_the_posteriors_components(name):
    op, sched, n = OPERATORS[name], S.linear(1000), 400
    x_star = DATA.sample(1, gen(6))
    y = op.A(x_star)
    post = DATA.posterior(O.matrix(op, DATA.shape), y.reshape(-1))
    x_T = torch.randn(n, *DATA.shape, generator=gen(7), dtype=torch.float64)
    out = ddnm(DATA.model(sched), x_T, sched, timesteps.make("leading", 100, sched), operator=op,
               y=y.expand(n, *y.shape[1:]), generator=gen(8))  # fmt: skip
    torch.testing.assert_close(op.A(out), y.expand_as(op.A(out)), rtol=0, atol=1e-12)  # A x0 = y
    if isinstance(op, O.Inpaint):  # the observed pixels are y's own
        kept = op.mask.bool().expand_as(out)
        torch.testing.assert_close(out[kept], x_star.expand_as(out)[kept], rtol=0, atol=1e-12)
    modes = torch.bincount(DATA.nearest_mode(out), minlength=3) / n
    assert 0.5 * float((modes - post.weights).abs().sum()) < 0.06


def test_ddnm_plus_with_noise_does_not_copy_the_noisy_observation():
    """sigma_y > 0: the output no longer copies y (which holds noise); its residual is of the noise's size."""
    op, sched, n, sigma_y = O.SuperRes(2), S.linear(1000), 400, 0.1
    x_star = DATA.sample(1, gen(9))
    y = op.A(x_star) + sigma_y * torch.randn(op.A(x_star).shape, generator=gen(10), dtype=torch.float64)
    x_T = torch.randn(n, *DATA.shape, generator=gen(11), dtype=torch.float64)
    out = ddnm(DATA.model(sched), x_T, sched, timesteps.make("leading", 100, sched), operator=op,
               y=y.expand(n, *y.shape[1:]), sigma_y=sigma_y, generator=gen(12))  # fmt: skip
    residual = (op.A(out) - y).flatten(1).pow(2).mean(1).sqrt()
    assert 0.3 * sigma_y < float(residual.mean()) < 3 * sigma_y
