"""Does a sample look like the built-in shapes (data=synthetic)? The quickstart's quality number, without a network.

Every image of that data set is one solid disc or square of one of six saturated colours on a flat background of
one of two grey levels. A sample passes when it is the same, read off its pixels:
- its border (the outermost ring of pixels) is flat: three in four border pixels within COLOUR_TOL of the border's
  median (a shape may touch it), and that median within LEVEL_TOL of one of the data's two backgrounds;
- the pixels off that background form one 8-connected blob (specks of a few pixels aside), of an area a shape of
  the data can have, filled: nearly all of it within COLOUR_TOL of one data colour.
The score is the share of samples that pass; the data itself scores 100% (tests/test_shapes.py), pure noise 0%.
"""

from __future__ import annotations

import numpy as np

from ..synthetic import BACKGROUNDS, COLOURS, RADII

__all__ = ["shape_score", "passes", "COLOUR_TOL", "LEVEL_TOL"]

COLOUR_TOL = 0.35  # per channel, on [-1, 1]: a pixel belongs to a colour within this (a quarter of its range)
LEVEL_TOL = 0.25  # the background's median against the data's two levels
FLAT = 0.9  # share of the blob's pixels that must sit on its colour
BORDER_FLAT = 0.75  # share of border pixels on the background (a large shape may touch an eighth of a 16x16 border)
SPECK = 4  # blobs of at most this many pixels are noise, not a second shape


def shape_score(images: np.ndarray) -> float:
    """The share of `images` (uint8 NHWC with 3 channels, as sample.py writes, or float NCHW in [-1, 1]) that are
    one solid shape of a data colour on a flat background of a data level."""
    x = _as_float_nchw(images)
    return float(np.mean([passes(image) for image in x])) if len(x) else 0.0


def passes(image: np.ndarray) -> bool:
    """One float [3, H, W] image in [-1, 1]: flat data background, one filled blob of one data colour."""
    from scipy import ndimage  # only the score needs it

    _, H, W = image.shape
    border = np.concatenate([image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], axis=1)  # [3, n]
    background = np.median(border, axis=1)
    if np.abs(background[:, None] - np.asarray(BACKGROUNDS)[None, :]).max(0).min() > LEVEL_TOL:
        return False
    if np.mean(np.abs(border - background[:, None]).max(0) <= COLOUR_TOL) < BORDER_FLAT:
        return False
    off = np.abs(image - background[:, None, None]).max(0) > COLOUR_TOL
    labels, _ = ndimage.label(off, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    if (sizes > SPECK).sum() != 1:
        return False
    blob = labels == 1 + int(np.argmax(sizes))
    area = blob.sum() / (H * W)
    smallest, largest = 0.5 * (0.85 * 2 * RADII[0]) ** 2, 1.3 * np.pi * RADII[1] ** 2  # a square, a disc; on pixels
    if not smallest <= area <= largest:
        return False
    pixels = image[:, blob]  # [3, n]
    distance = np.abs(pixels[None] - np.asarray(COLOURS)[:, :, None]).max(1)  # [colours, n]
    return bool((distance <= COLOUR_TOL).mean(1).max() >= FLAT)


def _as_float_nchw(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels (sample.py's samples.npz), got {images.shape}")
        return images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be NCHW with 3 channels in [-1, 1], got {images.shape}")
    return images.astype(np.float64)
