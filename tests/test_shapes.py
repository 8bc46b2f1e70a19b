"""The quickstart's quality number (diffusion.evaluation.shapes): the data passes, and each way a sample can fail to
look like it (noise, a speckled or blotched background, two shapes, no shape, a washed-out colour) is caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.evaluation.shapes import passes, shape_score
from diffusion.synthetic import BACKGROUNDS, Synthetic


def shapes(size: int, n: int = 300, seed: int = 0) -> np.ndarray:
    data = Synthetic(image_size=size, channels=3, batch_size=8, num_workers=0, seed=seed, num_images=n, num_val=1)
    train, _ = data.build()
    return torch.stack([train[i] for i in range(n)]).numpy().astype(np.float64)


def as_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [16, 32])
def test_the_data_scores_one_and_noise_zero(size):
    x = shapes(size)
    assert shape_score(x) == 1.0 and shape_score(as_uint8(x)) == 1.0  # float NCHW and sample.py's uint8 NHWC
    rng = np.random.default_rng(0)
    assert shape_score(rng.uniform(-1, 1, x.shape)) == 0.0
    assert shape_score(x + rng.normal(0, 0.3, x.shape)) == 0.0  # every pixel visibly noisy
    assert shape_score(x + rng.normal(0, 0.05, x.shape)) == 1.0  # slight noise is not a different image


def test_each_way_of_not_looking_like_the_data_fails():
    image = shapes(16, n=40)
    plain = next(im for im in image if np.isclose(im[:, 0, 0], BACKGROUNDS[0]).all() and passes(im))
    background = plain[:, 0, 0].copy()
    cases = {}
    cases["mid-grey background"] = plain + np.where(np.isclose(plain, background[:, None, None]), 0.6, 0.0)
    blotched = plain.copy()
    blotched[:, :, :8] = np.where(np.isclose(plain[:, :, :8], background[:, None, None]), 0.9, plain[:, :, :8])
    cases["half the background another level"] = blotched
    speckled = plain.copy()
    speckled[:, ::3, ::3] = 1.0  # white specks all over, border included
    cases["speckled"] = speckled
    cases["no shape"] = np.broadcast_to(background[:, None, None], plain.shape).copy()
    shape_mask = ~np.isclose(plain, background[:, None, None]).all(0)
    free = [(i, j) for i in range(1, 12) for j in range(1, 12) if not shape_mask[i - 1 : i + 4, j - 1 : j + 4].any()]
    (i, j), two = free[0], plain.copy()
    two[:, i : i + 3, j : j + 3] = np.array([1.0, -1.0, -1.0])[:, None, None]  # a second patch, apart from the shape
    cases["two shapes"] = two
    cases["washed-out colour"] = np.where(shape_mask, 0.3 * plain, plain)
    assert passes(plain)
    for name, case in cases.items():
        assert not passes(case), name


def test_wrong_layouts_are_refused_by_name():
    with pytest.raises(ValueError, match="NHWC"):
        shape_score(np.zeros((2, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        shape_score(np.zeros((2, 16, 16, 3)))
