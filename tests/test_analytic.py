"""Analytic-DPM against closed forms: Gamma and the optimal reverse variance on Gaussian data (where Theorem 1 is
exact), Gamma on a Gaussian mixture, the Theorem 2 clipping, the dynamic-programming trajectory against brute force,
the Gamma cache, and the likelihood bound against the true NLL of Gaussian data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffusion import sampling, timesteps
from diffusion.evaluation import likelihood
from diffusion.io import gamma_cache as analytic_cache
from diffusion.mixture import GaussianMixture
from diffusion.sampling import analytic
from diffusion.schedule import linear

MU, S2 = 0.3, 0.25  # Gaussian data N(MU, S2 I)
V = np.float64(0.5)  # a well-formed data_var for the damaged caches


def gaussian(shape=(3, 2, 2)) -> GaussianMixture:
    return GaussianMixture(torch.full((1, *shape), MU), torch.ones(1), S2**0.5)


def exact_gamma(schedule) -> torch.Tensor:
    """Gamma_t = (1 - abar) / (abar s^2 + 1 - abar) for N(mu, s^2 I) data."""
    abar = schedule.alphas_cumprod
    return (1 - abar) / (abar * S2 + 1 - abar)


# -------------------------------------------------------------------- Gamma and Theorem 1 on Gaussian data
def test_monte_carlo_gamma_converges_to_the_gaussian_closed_form():
    schedule, data, M = linear(50, 1e-3, 0.3), gaussian(), 200
    x0 = data.sample(M, torch.Generator().manual_seed(0)).float()
    gamma = analytic.estimate_gamma(data.model(schedule), x0, schedule, batch_size=1000,
                                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    exact = exact_gamma(schedule)
    # ||eps||^2 / d is Gamma chi2_d / d exactly here: standard error Gamma sqrt(2 / (d M)); 5 of them at each t
    d = x0[0].numel()
    assert gamma.dtype == torch.float64 and gamma.shape == (50,)
    assert bool(((gamma - exact).abs() <= 5 * exact * math.sqrt(2 / (d * M))).all())
    again = analytic.estimate_gamma(data.model(schedule), x0, schedule, batch_size=1000,
                                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(gamma, again)  # deterministic given the seed


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_theorem_1_is_the_true_optimal_variance_for_gaussian_data(eta):
    """Var[x_s | x_t] from the joint covariance of (x_s, x_t) (no Theorem involved) equals Theorem 1's sigma*^2 for
    every pair s < t of a 30-step schedule, and for s = clean data (Cov[x0 | x_t])."""
    schedule = linear(30, 1e-3, 0.2)
    abar, gamma = schedule.alphas_cumprod.tolist() + [1.0], exact_gamma(schedule).tolist()
    for t in range(30):
        v_t = abar[t] * S2 + 1 - abar[t]
        for s in range(-1, t):
            lam2 = eta**2 * (1 - abar[s]) / (1 - abar[t]) * (1 - abar[t] / abar[s])
            # q(x_s | x_t, x0): a x0 + b (x_t - c x0) + lam z; its marginal has Var[x_s] = abar_s S2 + 1 - abar_s
            a, c = abar[s] ** 0.5, abar[t] ** 0.5
            b = (1 - abar[s] - lam2) ** 0.5 / (1 - abar[t]) ** 0.5
            cov_st = (a - b * c) * c * S2 + b * v_t
            true = abar[s] * S2 + 1 - abar[s] - cov_st**2 / v_t
            sigma2, _ = analytic.reverse_variance(abar[t], abar[s], gamma[t], eta, raw=True)
            assert sigma2 == pytest.approx(true, rel=1e-9, abs=1e-13), (t, s)


@pytest.mark.parametrize("sampler, eta", [(analytic.analytic_ddpm, None), (analytic.analytic_ddim, 0.0)])
def test_the_analytic_samplers_are_exact_on_gaussian_data_at_few_steps(sampler, eta):
    """With the exact eps and Gamma, each reverse step is q(x_s | x_t) itself: 4 steps give N(MU, S2); DDPM's
    beta-tilde does not (its variance is too small), which shows the test can fail."""
    schedule, data = linear(1000), gaussian((4,))
    x = torch.randn(8000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts, g = timesteps.linspace(4, 1000), torch.Generator().manual_seed(1)
    options = {"gamma": exact_gamma(schedule), "clip": False, "noise_cap": None, "data_var": S2} | (
        {"eta": eta} if eta is not None else {}
    )
    out = sampler(data.model(schedule), x, schedule, ts, generator=g, **options)
    n = out.numel()
    assert float(out.mean()) == pytest.approx(MU, abs=5 * (S2 / n) ** 0.5)
    assert float(out.var()) == pytest.approx(S2, rel=5 * (2 / n) ** 0.5)
    plain = sampling.ddpm(data.model(schedule), x, schedule, ts, generator=g, clip=False)
    assert float(plain.var()) < S2 * (1 - 10 * (2 / n) ** 0.5)


def test_bad_sampler_options_are_named():
    schedule, x, ts = linear(10), torch.zeros(1, 1), timesteps.linspace(3, 10)
    model = gaussian((1,)).model(schedule)
    with pytest.raises(ValueError, match="need the model's Gamma"):
        analytic.analytic_ddpm(model, x, schedule, ts)
    with pytest.raises(ValueError, match=r"shape \[T=10\]"):
        analytic.analytic_ddpm(model, x, schedule, ts, gamma=torch.zeros(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        analytic.analytic_ddpm(model, x, schedule, ts, gamma=torch.full((10,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="eta must lie in"):
        analytic.analytic_ddim(model, x, schedule, ts, gamma=exact_gamma(schedule), eta=1.5)


# -------------------------------------------------------------------- the mixture and Theorem 2
def test_monte_carlo_gamma_on_the_mixture_matches_many_samples():
    schedule = linear(20, 1e-2, 0.5)
    mixture = GaussianMixture(torch.tensor([[-0.8] * 8, [0.6] * 8]), torch.tensor([1.0, 2.0]), 0.1)
    model = mixture.model(schedule)
    x0 = mixture.sample(100, torch.Generator().manual_seed(0)).float()
    gamma = analytic.estimate_gamma(model, x0, schedule, batch_size=999, generator=torch.Generator().manual_seed(1))
    # near-exact reference: 10000 fresh (x0, noise) per t, with the per-sample spread for the tolerance
    g, ref, err = torch.Generator().manual_seed(2), [], []
    for t in range(20):
        y0 = mixture.sample(10000, g)
        a = float(schedule.alphas_cumprod[t])
        x = a**0.5 * y0 + (1 - a) ** 0.5 * torch.randn(y0.shape, generator=g, dtype=torch.float64)
        per = model(x, torch.full((10000,), t)).pow(2).mean(1)
        ref.append(float(per.mean()))
        err.append(float(per.std()) / 100**0.5)  # the standard error of a 100-image mean
    assert bool(((gamma - torch.tensor(ref)).abs() <= 5 * torch.tensor(err) + 1e-4).all())
    assert float(gamma.max()) <= 1.1  # Gamma <= 1 in theory (Cov[x0 | x_t] >= 0), up to the Monte Carlo error


def test_theorem_2_bounds_hold_and_clipping_happens_exactly_outside_them():
    abar_t, abar_s = np.linspace(0.05, 0.9, 7), np.linspace(0.1, 0.95, 7)
    for gamma_t in (-0.5, 0.0, 0.3, 0.9, 1.0, 1.3):
        raw, lam2 = analytic.reverse_variance(abar_t, abar_s, gamma_t, raw=True)
        sigma2, _ = analytic.reverse_variance(abar_t, abar_s, gamma_t, bound=1.0)
        cov = (1 - abar_t) / abar_t * (1 - gamma_t)
        top = np.minimum((1 - abar_t) / abar_t, 1.0)
        coef = (raw - lam2) / np.where(cov == 0, 1, cov)
        assert bool((sigma2 >= lam2 - 1e-15).all()) and bool((sigma2 <= lam2 + coef * top + 1e-15).all())
        inside = (cov >= 0) & (cov <= top)
        np.testing.assert_allclose(sigma2[inside], raw[inside], rtol=1e-12)  # untouched inside the bounds
        np.testing.assert_allclose(sigma2[cov < 0], lam2[cov < 0], rtol=1e-12)  # Gamma > 1: the lower bound
        above = cov > top
        np.testing.assert_allclose(sigma2[above], (lam2 + coef * top)[above], rtol=1e-12)
    # unbounded data: only (1 - abar) / abar caps Cov, so a cov of 3 stays at abar_t = 0.05 (its cap is 19)
    unbounded, _ = analytic.reverse_variance(0.05, 0.1, 1 - 3 * 0.05 / 0.95, bound=math.inf)
    raw, _ = analytic.reverse_variance(0.05, 0.1, 1 - 3 * 0.05 / 0.95, raw=True)
    assert unbounded == pytest.approx(raw)


# -------------------------------------------------------------------- the optimal trajectory
def _random_gamma(T: int, seed: int) -> torch.Tensor:
    return torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.6 + 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_dynamic_programme_finds_the_brute_force_optimum(seed):
    T = 12
    schedule = linear(T, 1e-2, 0.5)
    gamma = _random_gamma(T, seed)
    J = analytic.cost_matrix(schedule, gamma)
    for K in range(1, 7):
        ts = analytic.optimal_trajectory(K, schedule, gamma)
        assert len(ts) == K and ts.dtype == torch.int64 and int(ts[0]) == T - 1
        assert bool((ts[:-1] > ts[1:]).all()) and (K == 1 or int(ts[-1]) == 0)
        if K < 3:
            continue
        best = min(
            sum(J[a, b] for a, b in zip((0, *mid), (*mid, T - 1), strict=True))
            for mid in itertools.combinations(range(1, T - 1), K - 2)
        )
        path = ts.flip(0).tolist()
        assert sum(J[a, b] for a, b in zip(path, path[1:], strict=False)) == pytest.approx(best, rel=1e-12)


def test_the_cost_is_the_papers_up_to_terms_that_telescope():
    """0.5 log(sigma*^2 / lambda^2) = 0.5 [log(1 - beta_{t|s} Gamma_t / (1 - abar_t)) + f(t) - f(s)] with
    f = log((1 - abar) / abar) (the official code's F[s, t]): the same optimal trajectories."""
    T = 40
    schedule = linear(T, 1e-3, 0.2)
    gamma = _random_gamma(T, 3)
    abar, g = schedule.alphas_cumprod.numpy(), gamma.numpy()
    J = analytic.cost_matrix(schedule, gamma, bound=math.inf, monotone=False)
    f = np.log((1 - abar) / abar)
    for s, t in itertools.combinations(range(T), 2):
        paper = np.log(1 - (1 - abar[t] / abar[s]) * g[t] / (1 - abar[t]))
        assert J[s, t] == pytest.approx(0.5 * (paper + f[t] - f[s]), rel=1e-9, abs=1e-12)


def test_even_is_the_official_even_trajectory_and_linspace_but_at_ties():
    """The official code's steps: 1 + i (N - 1) / (K - 1) accumulated in floats, rounded (1-based), for every K;
    within one step of linspace, which rounds the exact 0-based value (S = 3: 499 against 500)."""
    T = 1000
    for K in range(2, T + 1):
        stride, cur, official = (T - 1) / (K - 1), 1.0, []
        for _ in range(K):
            official.append(round(cur) - 1)
            cur += stride
        ts = timesteps.make("even", K, linear(T))
        assert ts.flip(0).tolist() == official, K
        assert int((ts - timesteps.linspace(K, T)).abs().max()) <= 1
    assert timesteps.even(3, T).tolist() == [999, 499, 0] and timesteps.linspace(3, T).tolist() == [999, 500, 0]


def test_the_trajectory_takes_cov_as_non_decreasing_in_t():
    """A Gamma estimated above 1 at t = 8 (Cov clipped to 0) makes the jump 8 -> 0 look free; the running maximum
    of Cov gives it the cost of the Cov reached below it."""
    T = 12
    schedule = linear(T, 1e-2, 0.5)
    gamma = _random_gamma(T, 0)
    noisy = gamma.clone()
    noisy[8] = 1.05
    raw, kept = analytic.cost_matrix(schedule, noisy, monotone=False), analytic.cost_matrix(schedule, noisy)
    assert raw[0, 8] == 0 and kept[0, 8] > 0
    abar = schedule.alphas_cumprod
    cov = ((1 - abar) / abar * (1 - gamma)).clamp(min=0)
    monotone = 1 - torch.cummax(cov, 0).values * abar / (1 - abar)
    np.testing.assert_allclose(
        analytic.cost_matrix(schedule, monotone, monotone=False), analytic.cost_matrix(schedule, gamma)
    )


# -------------------------------------------------------------------- the cache
class Scale(torch.nn.Module):
    """eps = w x, counting calls."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w, self.calls = torch.nn.Parameter(torch.tensor([w])), 0

    def forward(self, x, t):
        self.calls += 1
        return self.w * x


def _cached(model, tmp_path, M=3, loads=None):
    schedule = linear(20)

    def images():
        if loads is not None:
            loads.append(M)
        return torch.randn(M, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    return analytic_cache.cached_gamma(model, schedule, images, path_stem=tmp_path / "last", M=M, seed=0,
                                       data="test", batch_size=16, progress=False)  # fmt: skip


def test_gamma_is_cached_once_and_reused(tmp_path):
    model, loads = Scale(0.5), []
    first, data_var = _cached(model, tmp_path, loads=loads)
    assert len(list(tmp_path.glob("last.gamma.M3.*.npz"))) == 1 and loads == [3]
    calls = model.calls
    again, var_again = _cached(model, tmp_path, loads=loads)
    assert torch.equal(again, first) and var_again == data_var
    assert model.calls == calls and loads == [3]  # neither the data nor the model was touched


def test_other_weights_or_another_m_never_reuse_a_cache(tmp_path):
    a, _ = _cached(Scale(0.5), tmp_path)
    b, _ = _cached(Scale(0.7), tmp_path)  # e.g. last.ckpt overwritten, or the raw weights instead of the EMA ones
    c, _ = _cached(Scale(0.5), tmp_path, M=4)
    assert len(list(tmp_path.glob("last.gamma.*.npz"))) == 3
    assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path, key: path.write_bytes(b"not a zip"),
        lambda path, key: np.savez(path, gamma=np.array([object()] * 20), data_var=V, key=np.array(key)),  # a pickle
        lambda path, key: np.savez(path, gamma=np.zeros(19), data_var=V, key=np.array(key)),
        lambda path, key: np.savez(path, gamma=np.full(20, np.nan), data_var=V, key=np.array(key)),
        lambda path, key: np.savez(path, gamma=np.zeros(20, np.float32), data_var=V, key=np.array(key)),
        lambda path, key: np.savez(path, gamma=np.zeros(20), data_var=V, key=np.array("another model")),
        lambda path, key: np.savez(path, gamma=np.zeros(20), data_var=V, key=np.array(key), extra=np.zeros(1)),
        lambda path, key: np.savez(path, gamma=np.zeros(20), key=np.array(key)),  # format 1: no data_var
        lambda path, key: np.savez(path, gamma=np.zeros(20), data_var=np.float64(np.nan), key=np.array(key)),
        lambda path, key: np.savez(path, gamma=np.zeros(20), data_var=np.float64(0), key=np.array(key)),
        lambda path, key: np.savez(path, gamma=np.zeros(20), data_var=np.float32(0.5), key=np.array(key)),
        lambda path, key: np.savez(path, gamma=np.zeros(20), data_var=np.full(2, 0.5), key=np.array(key)),
    ],
)
def test_a_damaged_cache_is_refused_and_recomputed(damage, tmp_path, capsys):
    model = Scale(0.5)
    good, data_var = _cached(model, tmp_path)
    (path,) = tmp_path.glob("last.gamma.*.npz")
    with np.load(path) as f:
        key = str(f["key"])
    damage(path, key)
    recomputed, var = _cached(model, tmp_path)
    assert torch.equal(recomputed, good) and var == data_var
    assert "refusing the cached Gamma" in capsys.readouterr().out
    again, var_again = _cached(model, tmp_path)  # the rewritten file is good again
    assert torch.equal(again, good) and var_again == data_var and "refusing" not in capsys.readouterr().out


# -------------------------------------------------------------------- the likelihood bound
def test_the_bound_on_gaussian_data_approaches_the_true_nll_from_above():
    """Exact eps and Gamma on N(MU, S2 I): the analytic bound is the true NLL up to the prior's tiny mismatch at
    every K; beta-tilde's is above it and falls towards it as K grows."""
    schedule, data = linear(200, 5e-4, 0.1), gaussian((4,))
    x0 = data.sample(1000, torch.Generator().manual_seed(0))
    true = (0.5 * ((x0 - MU) ** 2 / S2 + math.log(2 * math.pi * S2))).sum(1) / (4 * math.log(2))
    gamma, previous = exact_gamma(schedule), math.inf
    for K in (2, 10, 50, 200):
        ts = timesteps.linspace(K, 200)
        kw = {"clip": False, "decoder": "gaussian", "generator": torch.Generator().manual_seed(K), "data_var": S2}
        ours = likelihood.nll_bound(data.model(schedule), x0, schedule, ts, variance="analytic", gamma=gamma, **kw)
        plain = likelihood.nll_bound(data.model(schedule), x0, schedule, ts, variance="posterior", **kw)
        gap, error = float((ours - true).mean()), float((ours - true).std()) / len(x0) ** 0.5
        assert -5 * error - 1e-3 <= gap <= 5 * error + 1e-3, K
        assert float(plain.mean()) > float(ours.mean()) and float(plain.mean()) < previous
        previous = float(plain.mean())


def test_the_discrete_decoder_sums_to_one_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64).view(256, 1)
    for mean, sigma2 in ((0.0, 1e-3), (0.93, 0.05), (-1.2, 1e-5)):
        log_p = likelihood._decoder_log_likelihood(levels, torch.full_like(levels, mean), sigma2, "discrete")
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
