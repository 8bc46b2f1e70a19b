"""A Gaussian-mixture data distribution whose optimal noise predictor is known in closed form.

For data x0 ~ sum_k w_k N(mu_k, s_k^2 I), the noisy x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is a mixture too:
x_t | k ~ N(sqrt(abar) mu_k, v_k I) with v_k = abar s_k^2 + 1 - abar, and the exact (MSE-optimal) noise prediction is

    E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - abar) (x_t - sqrt(abar) mu_k) / v_k,

with r_k(x_t) the posterior responsibility of component k. A sampler run on `model(schedule)` has no network
error, so what separates its samples from the mixture is the sampler's own error: the tests and the
quality-vs-steps benchmark measure it with `frechet` (data space) and `mode_weight_error`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .frechet import frechet_distance
from .schedule import Schedule, target

__all__ = ["GaussianMixture", "GaussianPosterior"]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """K isotropic Gaussians: `means` [K, *shape] (e.g. [K, D] or [K, C, H, W]), `weights` [K] (normalised
    here), `std` per component ([K], or one number for all; 0 gives point masses). Float64 throughout."""

    means: Tensor = field(repr=False)
    weights: Tensor = field(repr=False)
    std: Tensor | float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must be [K, *shape] with one row per component, got shape {tuple(means.shape)}")
        weights = torch.as_tensor(self.weights, dtype=torch.float64)
        std = torch.as_tensor(self.std, dtype=torch.float64)
        if std.numel() not in (1, len(means)):
            raise ValueError(
                f"std must be one number or {len(means)} (one per component), got shape {tuple(std.shape)}"
            )
        std = std.reshape(-1).expand(len(means)).clone()
        if weights.shape != (len(means),) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be {len(means)} non-negative numbers, not all zero, got {weights.tolist()}")
        if not bool((std >= 0).all()):
            raise ValueError(f"std must be >= 0, got {std.tolist()}")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "std", std)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self.means)}, shape={self.shape})"

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one data point."""
        return tuple(self.means.shape[1:])

    def sample(self, n: int, generator: torch.Generator | None = None, labels: bool = False) -> Tensor:
        """n exact samples [n, *shape], float64; with `labels`, (samples, their components k [n]) of the same draw."""
        k = self.components(n, generator)
        noise = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        x = self.means[k] + self.std[k].view(-1, *[1] * len(self.shape)) * noise
        return (x, k) if labels else x

    def components(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The components k [n] of n draws: the first draw `sample` makes from `generator`."""
        return torch.multinomial(self.weights, n, replacement=True, generator=generator)

    def component(self, k: int) -> GaussianMixture:
        """Component k alone, as a mixture of one (its Frechet distance, its samples)."""
        return GaussianMixture(self.means[k : k + 1], self.weights[k : k + 1], self.std[k : k + 1])

    # ---------------------------------------------------------------- the exact noise predictor
    def eps(self, x: Tensor, t: Tensor, schedule: Schedule, y: Tensor | None = None) -> Tensor:
        """E[eps | x_t = x] for x [B, *shape] at int64 timesteps t [B], computed in float64, returned in x's dtype.
        With labels y [B]: E[eps | x_t, k = y] for rows with 0 <= y < K (one Gaussian's), the mixture's for y = K
        ("no label"): the exact conditional and unconditional predictors classifier-free guidance combines."""
        xf, mu, abar, v, r = self._posterior(x, t, schedule, y)
        c = r / v  # r_k / v_k
        eps = (1 - abar).sqrt() * (xf * c.sum(1, keepdim=True) - abar.sqrt() * (c @ mu))
        return eps.reshape(x.shape).to(x.dtype)

    def x0(self, x: Tensor, t: Tensor, schedule: Schedule, y: Tensor | None = None) -> Tensor:
        """E[x0 | x_t = x] for x [B, *shape] at int64 t [B], directly (exact also at alpha_bar = 0, where it is the
        mixture's mean): sum_k r_k (mu_k + sqrt(abar) s_k^2 / v_k (x - sqrt(abar) mu_k)). Float64 inside; labels y
        as in `eps`."""
        xf, mu, abar, v, r = self._posterior(x, t, schedule, y)
        gain = abar.sqrt() * self.std.to(xf.device) ** 2 / v  # [B, K]: how much of x_t's deviation each keeps
        mean = r @ mu + (r * gain).sum(1, keepdim=True) * xf - ((r * gain * abar.sqrt()) @ mu)
        return mean.reshape(x.shape).to(x.dtype)

    def _posterior(self, x: Tensor, t: Tensor, schedule: Schedule, y: Tensor | None) -> tuple[Tensor, ...]:
        """(x [B, D], means [K, D], abar [B, 1], v_k [B, K], responsibilities r_k(x_t) [B, K]), float64; a label y
        in [0, K) puts all the weight on its component, y = K (or None) leaves the mixture's posterior."""
        xf = x.reshape(len(x), -1).double()
        mu = self.means.reshape(len(self.means), -1).to(xf.device)
        abar = schedule.alpha_bar(t).to(xf.device).view(-1, 1)  # [B, 1]
        v = abar * self.std.to(xf.device) ** 2 + (1 - abar)  # [B, K]
        # log N(x; sqrt(abar) mu_k, v_k I) up to a constant; ||x - a mu||^2 expanded to avoid a [B, K, D] tensor
        dist2 = (xf**2).sum(1, keepdim=True) - 2 * abar.sqrt() * (xf @ mu.T) + abar * (mu**2).sum(1)
        logits = self.weights.to(xf.device).log() - 0.5 * xf.shape[1] * v.log() - dist2.clamp(min=0) / (2 * v)
        if y is not None:
            y = torch.as_tensor(y, device=xf.device).reshape(-1, 1)
            k = torch.arange(len(mu), device=xf.device)
            logits = logits.masked_fill((y < len(mu)) & (k != y), float("-inf"))
        return xf, mu, abar, v, logits.softmax(dim=1)

    def model(self, schedule: Schedule) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact noise predictor as a sampler's `model(x, t) -> eps`."""
        return partial(self.eps, schedule=schedule)

    def conditional(self, schedule: Schedule) -> Callable[..., Tensor]:
        """The exact class-conditional noise predictor `net(x, t, y=None) -> eps`, one class per component (label K
        or None: the mixture), as a conditional network is called (diffusion.wrappers.guidance)."""

        def net(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
            return self.eps(x, t, schedule, y)

        return net

    def predictor(self, schedule: Schedule, prediction: str) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact network for a prediction target (eps, x0, or v = alpha eps - sigma x0), as `net(x, t)`."""
        if prediction == "eps":
            return self.model(schedule)

        def net(x: Tensor, t: Tensor) -> Tensor:
            x0 = self.x0(x, t, schedule)
            if prediction == "x0":
                return x0
            abar = schedule.alpha_bar(t).to(x.device, x.dtype).view(-1, *[1] * (x.ndim - 1))
            return target("v", x0, self.eps(x, t, schedule), abar)

        return net

    # ---------------------------------------------------------------- the posterior of a linear observation
    def posterior(self, A: Tensor, y: Tensor, sigma_y: float = 0.0) -> GaussianPosterior:
        """p(x | y) for y = A x + N(0, sigma_y^2 I): A [m, D] (diffusion.operators.matrix), y [m]. Again a mixture:
        component k conditioned on y (Gaussian: mean mu_k + G_k (y - A mu_k), covariance s_k^2 (I - G_k A) with
        G_k = s_k^2 A^T S_k^-1), its weight re-scored by the evidence N(y; A mu_k, S_k), S_k = s_k^2 A A^T +
        sigma_y^2 I. sigma_y = 0 is exact too (G_k = A+): the samples then satisfy A x = y. Rows of A that are zero
        (the missing pixels of inpainting) are dropped with their y. Float64."""
        A, y = A.double(), y.double().reshape(-1)
        kept = A.abs().sum(1) > 0  # rows that see nothing (an inpainting mask's missing pixels) say nothing
        A, y = A[kept], y[kept]
        mu = self.means.reshape(len(self.means), -1)
        D, eye = mu.shape[1], torch.eye(A.shape[0], dtype=torch.float64)
        means, covs, logw = [], [], []
        for k in range(len(mu)):
            s2 = float(self.std[k]) ** 2
            S = s2 * (A @ A.T) + sigma_y**2 * eye
            L = torch.linalg.cholesky(S)
            gain = s2 * torch.cholesky_solve(A, L).T  # [D, m] = s_k^2 A^T S^-1
            r = y - A @ mu[k]
            means.append(mu[k] + gain @ r)
            covs.append(s2 * (torch.eye(D, dtype=torch.float64) - gain @ A))
            z = torch.linalg.solve_triangular(L, r[:, None], upper=False)[:, 0]
            logw.append(self.weights[k].log() - 0.5 * (z @ z) - L.diagonal().log().sum())
        return GaussianPosterior(torch.stack(means), torch.stack(covs), torch.stack(logw).softmax(0))

    # ---------------------------------------------------------------- distances to the mixture
    def moments(self) -> tuple[Tensor, Tensor]:
        """The mixture's mean [D] and covariance [D, D] (data flattened)."""
        mu = self.means.reshape(len(self.means), -1)
        mean = self.weights @ mu
        spread = float(self.weights @ self.std**2) * torch.eye(mu.shape[1], dtype=torch.float64)
        return mean, (self.weights[:, None] * mu).T @ mu + spread - torch.outer(mean, mean)

    def frechet(self, samples: Tensor) -> float:
        """Frechet distance in data space between the Gaussian fit of `samples` [N, *shape] and the mixture's
        own mean and covariance (an FID without the Inception network)."""
        flat = samples.reshape(len(samples), -1).double().cpu()
        mean, cov = self.moments()
        return frechet_distance(flat.mean(0), torch.cov(flat.T).reshape(len(mean), -1), mean, cov)

    def nearest_mode(self, samples: Tensor) -> Tensor:
        """The index of the mean nearest to each of `samples` [N, *shape]: [N]."""
        flat = samples.reshape(len(samples), -1).double().cpu()
        return torch.cdist(flat, self.means.reshape(len(self.means), -1)).argmin(1)

    def mode_weight_error(self, samples: Tensor) -> float:
        """Total variation between the true weights and the fraction of `samples` nearest to each mean."""
        found = torch.bincount(self.nearest_mode(samples), minlength=len(self.means)) / len(samples)
        return 0.5 * float((found - self.weights).abs().sum())


@dataclass(frozen=True, eq=False)
class GaussianPosterior:
    """A mixture of Gaussians with full covariances (the posterior of a GaussianMixture given a linear observation):
    `means` [K, D], `covs` [K, D, D], `weights` [K], float64, the data flattened."""

    means: Tensor = field(repr=False)
    covs: Tensor = field(repr=False)
    weights: Tensor = field(repr=False)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples [n, D] (covariances may be singular: the noiseless posterior lies on A x = y)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        values, vectors = torch.linalg.eigh(self.covs)  # [K, D], [K, D, D]
        root = vectors * values.clamp(min=0).sqrt()[:, None, :]
        z = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        return self.means[k] + torch.einsum("nij,nj->ni", root[k], z)

    def moments(self) -> tuple[Tensor, Tensor]:
        """The posterior's mean [D] and covariance [D, D]."""
        mean = self.weights @ self.means
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return mean, second - torch.outer(mean, mean)

    def frechet(self, samples: Tensor) -> float:
        """Frechet distance between the Gaussian fit of `samples` [N, ...] and the posterior's mean and covariance."""
        flat = samples.reshape(len(samples), -1).double().cpu()
        mean, cov = self.moments()
        return frechet_distance(flat.mean(0), torch.cov(flat.T).reshape(len(mean), -1), mean, cov)
