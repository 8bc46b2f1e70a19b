"""Theorem 2's data bound apart from clipping: the data's variance bounds Cov[x0 | x_t] (law of total variance), exact
on Gaussian data; the variance cached beside Gamma is the images' sample variance; an old-format cache is rebuilt;
the cosine schedule's noisy end, where a 1% error in Gamma made the first step's variance explode, is now bounded."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from diffusion import timesteps
from diffusion.evaluation import likelihood
from diffusion.io import gamma_cache as analytic_cache
from diffusion.mixture import GaussianMixture
from diffusion.sampling import analytic
from diffusion.schedule import cosine, linear

from .test_analytic import Scale  # eps = w x, counting calls

S = torch.tensor([0.05, 0.3, 0.7, 1.6], dtype=torch.float64)  # per-coordinate std of N(MU, diag(S^2)) data
MU = torch.tensor([0.2, -0.5, 0.0, 1.0], dtype=torch.float64)


def gaussian_eps(schedule, std=S):
    """The exact eps of N(MU, diag(std^2)) data: (x - sqrt(a) MU) sqrt(1 - a) / (a std^2 + 1 - a)."""
    abar = schedule.alphas_cumprod

    def model(x, t):
        a = abar[t].view(-1, 1)
        return (x - a.sqrt() * MU) * (1 - a).sqrt() / (a * std**2 + 1 - a)

    return model


def exact_gamma(schedule, std=S) -> torch.Tensor:
    """Gamma_t = mean_i E eps_i^2 = mean_i (1 - a) / (a std_i^2 + 1 - a)."""
    a = schedule.alphas_cumprod.view(-1, 1)
    return ((1 - a) / (a * std**2 + 1 - a)).mean(1)


@pytest.mark.parametrize("schedule", [linear(1000), cosine(1000)], ids=["linear", "cosine"])
def test_the_data_variance_bounds_cov_x0_given_x_t_exactly_on_gaussian_data(schedule):
    """From the joint covariance of (x0, x_t) alone: Cov[x0_i | x_t] = S_i^2 - a S_i^4 / (a S_i^2 + 1 - a) <= S_i^2 at
    every t, per coordinate; Gamma's estimate (1 - a) / a (1 - Gamma) is their mean, below tr Cov[x0] / d; so the
    clipped variance equals Theorem 1's for every pair s < t and eta (the bound never cuts a true value)."""
    a = schedule.alphas_cumprod.view(-1, 1)
    cov = S**2 - (a.sqrt() * S**2) ** 2 / (a * S**2 + 1 - a)  # Var x0 - Cov(x0, x_t)^2 / Var x_t
    assert bool((cov <= S**2).all()) and bool((cov > 0).all())
    gamma, data_var = exact_gamma(schedule), float((S**2).mean())
    estimate = (1 - a[:, 0]) / a[:, 0] * (1 - gamma)
    np.testing.assert_allclose(estimate, cov.mean(1), rtol=1e-5)
    assert bool((estimate <= data_var * (1 + 1e-6)).all())
    abar = schedule.alphas_cumprod.numpy()
    s, t = np.triu_indices(schedule.T, k=1)
    s, t = s[::97], t[::97]  # ~5000 of the 500k pairs, spread over every t
    for eta in (0.0, 0.5, 1.0):
        raw, _ = analytic.reverse_variance(abar[t], abar[s], gamma.numpy()[t], eta, raw=True)
        bounded, _ = analytic.reverse_variance(abar[t], abar[s], gamma.numpy()[t], eta, bound=data_var)
        np.testing.assert_allclose(bounded, raw, rtol=1e-6, atol=1e-15)
    # and a smaller bound does cut: the test could fail
    cut, _ = analytic.reverse_variance(abar[-1], abar[-2], float(gamma[-1]), bound=0.5 * data_var)
    full, _ = analytic.reverse_variance(abar[-1], abar[-2], float(gamma[-1]), raw=True)
    assert cut < full


def test_data_variance_is_the_per_coordinate_sample_variance():
    x0 = torch.randn(50, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1.0, 2.0]).view(
        3, 1, 1
    )
    expected = float(np.var(x0.double().numpy(), axis=0, ddof=1).mean())
    assert analytic.data_variance(x0) == pytest.approx(expected, rel=1e-12)
    assert analytic.data_variance(x0[:1]) == math.inf  # one image: no spread known, no bound
    with pytest.raises(ValueError, match="at least one image"):
        analytic.data_variance(torch.zeros(0, 3))


def _images(M=5):
    return torch.randn(M, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.1


def _cached(model, tmp_path, M=5):
    return analytic_cache.cached_gamma(model, linear(20), lambda: _images(M), path_stem=tmp_path / "last", M=M,
                                       seed=0, data="test", batch_size=16, progress=False)  # fmt: skip


def test_the_cached_data_variance_is_the_sample_variance_of_the_gamma_images(tmp_path):
    gamma, data_var = _cached(Scale(0.5), tmp_path)
    assert data_var == pytest.approx(float(np.var(_images().double().numpy(), axis=0, ddof=1).mean()), rel=1e-12)
    (path,) = tmp_path.glob("last.gamma.M5.*.npz")
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["data_var", "gamma", "key"] and f["data_var"].dtype == np.float64
        assert float(f["data_var"]) == data_var and '"format": 2' in str(f["key"])
    _, one = _cached(Scale(0.5), tmp_path, M=1)
    assert one == math.inf  # written and read back as inf: M = 1 bounds nothing


def test_an_old_format_cache_is_recomputed_not_misread(tmp_path, capsys):
    """A format-1 file (gamma and key, no data_var) under the new name is refused; under its own name (its key had
    no format) it is never opened: the new key names another file."""
    model = Scale(0.5)
    good, data_var = _cached(model, tmp_path)
    (path,) = tmp_path.glob("last.gamma.*.npz")
    with np.load(path) as f:
        key = str(f["key"])
    np.savez(path, gamma=np.full(20, 0.123), key=np.array(key))
    calls = model.calls
    again, var_again = _cached(model, tmp_path)
    assert "refusing the cached Gamma" in capsys.readouterr().out and model.calls > calls
    assert torch.equal(again, good) and var_again == data_var
    old = tmp_path / "old"
    old.mkdir()
    old_key = key.replace(', "format": 2', "")
    old_path = old / f"last.gamma.M5.{hashlib.sha256(old_key.encode()).hexdigest()[:16]}.npz"
    np.savez(old_path, gamma=np.full(20, 0.123), key=np.array(old_key))
    gamma, _ = _cached(model, old)
    assert torch.equal(gamma, good) and len(list(old.glob("*.npz"))) == 2  # computed, the old file left alone


def test_the_cosine_failure_case_now_gives_a_bounded_first_step():
    """Cosine schedule, even trajectory, K = 10: Gamma 1% low at every t (a Monte Carlo error) made the first step's
    analytic variance ~1e5 ((1 - abar) / abar ~ 4e8 was the only cap); the data variance caps it below 1, and the
    whole chain still samples the data closely (isotropic: one sigma serves every coordinate). data_var = inf (the
    old behaviour) shows the failure."""
    schedule, std = cosine(1000), torch.full((4,), 0.5, dtype=torch.float64)
    gamma, data_var = 0.99 * exact_gamma(schedule, std), 0.25
    ts, abar = timesteps.even(10, 1000), schedule.alphas_cumprod.numpy()
    t, s = int(ts[0]), int(ts[1])
    for eta in (0.0, 1.0):
        old, lam2 = analytic.reverse_variance(abar[t], abar[s], float(gamma[t]), eta, bound=math.inf)
        new, _ = analytic.reverse_variance(abar[t], abar[s], float(gamma[t]), eta, bound=data_var)
        assert old > 100 and lam2 <= new <= lam2 + abar[s] * data_var + 1e-12 and new < 1, (eta, old, new)
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model, kw = gaussian_eps(schedule, std), {"gamma": gamma, "clip": False, "noise_cap": None, "eta": 0.0}
    out = analytic.analytic_ddim(model, x, schedule, ts, generator=torch.Generator().manual_seed(1), data_var=data_var,
                                 **kw)  # fmt: skip
    np.testing.assert_allclose(out.var(0), std**2, rtol=0.15)
    np.testing.assert_allclose(out.mean(0), MU, atol=0.1)
    g = torch.Generator().manual_seed(1)
    blown = analytic.analytic_ddim(model, x, schedule, ts, generator=g, data_var=math.inf, **kw)
    assert float(blown.var(0).mean()) > 100 * data_var


def test_unclipped_analytic_dpm_asks_for_the_data_variance():
    schedule, x, ts = linear(10), torch.zeros(1, 1), timesteps.linspace(3, 10)
    model, gamma = GaussianMixture(torch.zeros(1, 1), torch.ones(1), 0.5).model(schedule), torch.full((10,), 0.5)
    for sampler in (analytic.analytic_ddpm, analytic.analytic_ddim):
        with pytest.raises(ValueError, match="needs the data's variance data_var"):
            sampler(model, x, schedule, ts, gamma=gamma.double(), clip=False)
        with pytest.raises(ValueError, match="data_var must be > 0"):
            sampler(model, x, schedule, ts, gamma=gamma.double(), clip=False, data_var=float("nan"))
        sampler(model, x, schedule, ts, gamma=gamma.double(), clip=True)  # images: the paper's bound 1, no data_var
    with pytest.raises(ValueError, match="needs the data's variance"):
        likelihood.nll_bound(model, x, schedule, ts, variance="analytic", gamma=gamma.double(), clip=False)
    assert analytic.cov_bound(True, None) == 1.0 and analytic.cov_bound(True, 0.2) == 1.0  # the paper's, kept
    assert analytic.cov_bound(False, 0.2) == 0.2 and analytic.cov_bound(False, math.inf) == math.inf
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="data_var must be > 0"):
            analytic.cov_bound(False, bad)
