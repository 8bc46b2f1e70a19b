"""FID: the Frechet distance against closed forms for Gaussians; the pipeline end to end (samples .npz -> features
-> statistics -> FID, the training set's statistics un-augmented, cached and reused) with the Inception swapped for
a small stand-in; missing Inception weights offline give one clear error naming the file and the place."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion.errors import UsageError
from diffusion.evaluation import fid as metrics
from diffusion.evaluation.fid import FIDResult, fid_from_npz, frechet_distance
from diffusion.images import save_npz, to_uint8
from diffusion.synthetic import Synthetic

from .conftest import ROOT


def spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


# ---------------------------------------------------------------- the Frechet distance against closed forms


def test_one_dimensional_gaussians():
    """W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2."""
    assert frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_diagonal_covariances():
    """|mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)), zero variances (singular covariances) included."""
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.normal(size=40), rng.normal(size=40), rng.uniform(0, 3, 40), rng.uniform(0, 3, 40)
    s1[:5] = 0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_commuting_full_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: the trace term is sum(a + b - 2 sqrt(a b)) whatever the rotation Q."""
    rng = np.random.default_rng(1)
    q, a, b = rotation(30, rng), rng.uniform(0.1, 2, 30), rng.uniform(0.1, 2, 30)
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, q * a @ q.T, mu2, q * b @ q.T) == pytest.approx(expected, rel=1e-10)


def test_non_commuting_2x2_by_hand():
    """For 2x2 matrices Tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) (sum of the two eigenvalues' roots)."""
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    trace_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.25 + 9.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_non_commuting_transport_map():
    """S2 = T S1 T with T symmetric positive definite: S1^(1/2) S2 S1^(1/2) = (S1^(1/2) T S1^(1/2))^2, so the trace
    term is tr(T S1) with no square root at all."""
    rng = np.random.default_rng(2)
    s1, t = spd(64, rng), spd(64, rng)
    s2 = t @ s1 @ t
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu = rng.normal(size=64)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(t @ s1)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


def test_zero_for_identical_statistics_and_symmetric():
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.normal(size=50), rng.normal(size=50), spd(50, rng, rank=20), spd(50, rng, rank=30)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "different extractors"),
        ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"sigma1 \[D, D\]"),
        ((np.zeros(2), np.diag([1.0, np.nan]), np.zeros(2), np.eye(2)), "NaN"),
        ((np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2)), "negative eigenvalue"),
        ((np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), "not symmetric"),
    ],
)
def test_bad_statistics_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_stats_and_the_npz_format(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, 5)).astype(np.float32)
    mu, sigma = metrics.stats(x)
    centred = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    np.testing.assert_allclose(sigma, centred.T @ centred / 99, rtol=1e-12)
    path = metrics.save_stats(tmp_path / "ref.npz", mu, sigma, n=100, source="test")
    with np.load(path) as f:  # what pytorch-fid reads
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    assert metrics.load_stats(path)[2] == {"n": 100, "source": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # the temporary file was renamed
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(UsageError, match="no mu and sigma"):
        metrics.load_stats(tmp_path / "bad.npz")


# ---------------------------------------------------------------- the pipeline with a stand-in feature network


class StandIn(torch.nn.Module):
    """Inception's stand-in: a fixed random projection of the pixels (so a flip changes it), counting its calls."""

    name = "stand-in projection"

    def __init__(self, pixels: int = 8 * 8 * 3, dim: int = 6) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(pixels, dim, generator=torch.Generator().manual_seed(0)))
        self.calls, self.training_flags = 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += 1
        self.training_flags.append(self.training)
        return (x.float().flatten(1) / 255) @ self.w


def data(**kwargs) -> Synthetic:
    return Synthetic(num_images=24, num_val=4, image_size=8, batch_size=8, num_workers=0, hflip=True, seed=3, **kwargs)


def train_images() -> np.ndarray:
    train, _ = data().build()
    return to_uint8(torch.stack([train[i] for i in range(len(train))]))


def direct_stats(net: StandIn, images: np.ndarray):
    with torch.no_grad():
        return metrics.stats(net.w.new_tensor(images).permute(0, 3, 1, 2).flatten(1).div(255) @ net.w)


OPTIONS = {"batch_size": 10, "device": "cpu", "progress": False}


def test_fid_end_to_end_with_a_cached_unaugmented_reference(tmp_path):
    net, images, cache = StandIn(), train_images(), tmp_path / "fid_stats"
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    save_npz(images, tmp_path / "same.npz")
    save_npz(flipped, tmp_path / "flipped.npz")

    result = fid_from_npz(tmp_path / "same.npz", data(), cache_dir=cache, extractor=net, **OPTIONS)
    assert net.calls == 3 + 3  # reference: 24 images in batches of 10; samples: the same
    assert not any(net.training_flags)  # eval mode
    assert result.fid == pytest.approx(0, abs=1e-9)  # the training set against itself: the reference is not flipped
    (stats_file,) = cache.iterdir()  # one cached file, no temporaries
    mu_ref, sigma_ref, meta = metrics.load_stats(stats_file)
    mu, sigma = direct_stats(net, images)
    np.testing.assert_allclose(mu_ref, mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma_ref, sigma, rtol=1e-5, atol=1e-6)
    assert meta["n"] == 24 and meta["extractor"] == StandIn.name and meta["image_size"] == 8
    assert result == FIDResult(result.fid, 24, result.reference, 24, StandIn.name, None)
    assert "Synthetic training set" in result.reference and str(stats_file) in result.reference
    assert set(result.as_dict()) == {"fid", "n_samples", "reference", "n_reference", "extractor", "weights"}

    # Reused, not recomputed, also when the reference comes as a checkpoint's data config: only the samples run.
    config = {"_target_": "diffusion.synthetic.Synthetic", "root": "", "num_images": 24, "num_val": 4, "image_size": 8,
              "channels": 3, "batch_size": 8, "num_workers": 0, "hflip": True, "seed": 3}  # fmt: skip
    again = fid_from_npz(tmp_path / "flipped.npz", config, cache_dir=cache, extractor=net, **OPTIONS)
    assert net.calls == 6 + 3 and len(list(cache.iterdir())) == 1
    expected = frechet_distance(*direct_stats(net, flipped), mu, sigma)
    assert expected > 1e-3  # a flip is visible to the stand-in, so an augmented reference would have shown
    assert again.fid == pytest.approx(expected, rel=1e-5)


def test_user_reference_npz(tmp_path):
    """A bare pytorch-fid style .npz (mu, sigma only) is accepted; its image count is unknown."""
    net, images = StandIn(), train_images()
    save_npz(images[:12], tmp_path / "samples.npz")
    mu, sigma = direct_stats(net, images[12:])
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    result = fid_from_npz(tmp_path / "samples.npz", str(tmp_path / "ref.npz"), extractor=net, **OPTIONS)
    assert result.fid == pytest.approx(frechet_distance(*direct_stats(net, images[:12]), mu, sigma), rel=1e-5)
    assert (result.n_samples, result.reference, result.n_reference) == (12, str(tmp_path / "ref.npz"), None)


def test_reference_stats_cache_skips_the_images(tmp_path):
    net, images = StandIn(), train_images()
    first = metrics.reference_stats(images, tmp_path / "ref.npz", extractor=net, **OPTIONS)

    def untouchable():
        raise AssertionError("the cached statistics should have been used")
        yield

    second = metrics.reference_stats(untouchable(), tmp_path / "ref.npz", extractor=net, **OPTIONS)
    np.testing.assert_array_equal(first[1], second[1])
    assert net.calls == 3 and second[2]["n"] == 24


def test_samples_of_another_size_are_refused(tmp_path):
    save_npz(np.zeros((4, 16, 16, 3), np.uint8), tmp_path / "samples.npz")
    with pytest.raises(UsageError, match="16px .* 8px"):
        fid_from_npz(tmp_path / "samples.npz", data(), cache_dir=tmp_path, extractor=StandIn(), **OPTIONS)


# ---------------------------------------------------------------- command line


def test_cli_prints_the_fid_with_its_provenance(tmp_path, monkeypatch, capsys):
    net, images = StandIn(), train_images()
    save_npz(images, tmp_path / "samples.npz")
    metrics.save_stats(tmp_path / "ref.npz", *direct_stats(net, images), n=24)
    monkeypatch.setattr(metrics, "Inception", StandIn)
    assert metrics.main([str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"FID \S+ of 24 samples vs ", out) and "(24 images)" in out and StandIn.name in out


def test_cli_bad_path_is_one_line(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "diffusion.evaluation.fid", str(tmp_path / "missing.npz"), "cifar10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ") and "missing.npz" in run.stderr
