"""The Frechet distance between Gaussians and the Gaussian statistics of features (Heusel et al. 2017, eq. 6), numpy
only: FID (diffusion.evaluation.fid) and the mixture benchmarks (diffusion.mixture) share it."""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "check_gaussian", "stats"]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017, eq. 6).

    In float64. Tr (S1 S2)^(1/2) sums the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which are those
    of S1 S2 but come from a symmetric PSD matrix: no complex sqrtm, and singular covariances (fewer samples than
    features) are exact. Round-off negatives are clipped; clearly negative eigenvalues (not a covariance) raise."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    for i, mu, sigma in ((1, mu1, sigma1), (2, mu2, sigma2)):
        check_gaussian(mu, sigma, f"mu{i}", f"sigma{i}")
    if len(mu1) != len(mu2):
        raise ValueError(f"the statistics have {len(mu1)} and {len(mu2)} features: they come from different extractors")
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(_clip_psd(w1, "sigma1"))) @ v1.T
    m = root1 @ ((sigma2 + sigma2.T) / 2) @ root1
    trace_sqrt = np.sqrt(_clip_psd(np.linalg.eigvalsh((m + m.T) / 2), "sigma2")).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt), 0.0)


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, mu_name: str = "mu", sigma_name: str = "sigma") -> None:
    """ValueError unless mu is [D] and sigma [D, D], both finite and sigma symmetric (a Frechet distance's input)."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{mu_name} must be [D] and {sigma_name} [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{mu_name} or {sigma_name} has NaN or infinite entries")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * np.abs(sigma).max()):
        raise ValueError(f"{sigma_name} is not symmetric: it is not a covariance matrix")


def _clip_psd(w: np.ndarray, name: str) -> np.ndarray:
    if w.min() < -1e-6 * max(np.abs(w).max(), 1e-12):
        raise ValueError(f"{name} has a negative eigenvalue ({w.min():.3g}): it is not a covariance matrix")
    return np.clip(w, 0, None)


def stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"statistics need features [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))
