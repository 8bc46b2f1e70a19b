"""The linear degradations y = A x of image restoration, each with its pseudo-inverse A+ (DDNM's range-null-space
decomposition, Wang et al. 2023: x = A+ A x + (I - A+ A) x).

    Inpaint(mask)     A = diag(mask): the observed pixels (mask 1), others 0; A+ = A                (A A^T = I)
    SuperRes(f)       A = f x f average pooling; A+ = nearest upsampling (A^T (A A^T)^-1, A A^T = I / f^2)
    Colorize()        A = the mean of the channels (the grey level); A+ = that grey on every channel (A A^T = I / 3)

Every operator takes images [B, C, H, W] (any float dtype) and is exactly linear, so `matrix(op, shape)` is its
dense [m, D] form, which the exact mixture posterior (diffusion.mixture.GaussianMixture.posterior) uses. A A^T = s^2 I
on the range for each: `singular` is that one singular value s (DDNM+ scales its correction by it).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Operator", "Inpaint", "SuperRes", "Colorize", "matrix", "box_mask", "half_mask", "random_mask"]


class Operator(Protocol):
    """A linear degradation: A(x) -> y and A+(y) -> x, the minimum-norm x with A x = y; `singular`: A's nonzero
    singular value (one per operator here)."""

    singular: float

    def A(self, x: Tensor) -> Tensor: ...

    def pinv(self, y: Tensor) -> Tensor: ...


class Inpaint:
    """Keep the pixels where `mask` [1 or C, H, W] (or [B, ...]) is 1. y is the masked image, zeros elsewhere."""

    singular = 1.0

    def __init__(self, mask: Tensor) -> None:
        mask = torch.as_tensor(mask)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("an inpainting mask holds 0 (missing) and 1 (observed) only")
        self.mask = mask

    def _m(self, x: Tensor) -> Tensor:
        if self.mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"the mask is {tuple(self.mask.shape[-2:])} pixels and the image {tuple(x.shape[-2:])}: "
                             "give a mask of the image's size")  # fmt: skip
        return self.mask.to(x.device, x.dtype)

    def A(self, x: Tensor) -> Tensor:
        return x * self._m(x)

    def pinv(self, y: Tensor) -> Tensor:
        return y * self._m(y)

    def __repr__(self) -> str:
        return f"Inpaint({float(self.mask.float().mean()):.0%} observed)"


class SuperRes:
    """f x f average pooling: y [B, C, H / f, W / f]."""

    def __init__(self, factor: int) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor={factor!r} must be a whole number >= 1 (2 or 4 for 2x / 4x super-resolution)")
        self.factor, self.singular = factor, 1.0 / factor

    def A(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"factor={self.factor} does not divide the image's {h}x{w} pixels: choose a divisor")
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, -1).repeat_interleave(self.factor, -2)

    def __repr__(self) -> str:
        return f"SuperRes({self.factor}x)"


class Colorize:
    """The grey level, the mean of the channels: y [B, 1, H, W]."""

    singular = 3**-0.5

    def A(self, x: Tensor) -> Tensor:
        if x.shape[-3] == 1:
            raise ValueError("colorization needs colour images (3 channels); these have one")
        return x.mean(-3, keepdim=True)

    def pinv(self, y: Tensor, channels: int = 3) -> Tensor:
        return y.expand(*y.shape[:-3], channels, *y.shape[-2:])

    def __repr__(self) -> str:
        return "Colorize()"


def matrix(op: Operator, shape: tuple[int, ...]) -> Tensor:
    """The dense [m, D] matrix of `op` on images of `shape` [C, H, W] (D = C H W), float64: column j is A e_j."""
    D = int(torch.tensor(shape).prod())
    basis = torch.eye(D, dtype=torch.float64).reshape(D, *shape)
    return op.A(basis).reshape(D, -1).T.contiguous()


# ---------------------------------------------------------------- the masks of inpainting


def box_mask(size: int, box: float = 0.5) -> Tensor:
    """[1, size, size]: a centred square of side `box` of the image missing (RePaint's and DDNM's box task)."""
    mask = torch.ones(1, size, size)
    side = round(box * size)
    lo = (size - side) // 2
    mask[:, lo : lo + side, lo : lo + side] = 0
    return mask


def half_mask(size: int) -> Tensor:
    """[1, size, size]: the right half missing (RePaint's "expand" style half-image task)."""
    mask = torch.ones(1, size, size)
    mask[:, :, size // 2 :] = 0
    return mask


def random_mask(size: int, missing: float = 0.8, seed: int = 0) -> Tensor:
    """[1, size, size]: each pixel missing with probability `missing`, from a fixed seed (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, size, size, generator=g) >= missing).float()
