"""Built-in data that needs no download: coloured shapes (the quickstart) and a Gaussian mixture of images whose
optimal noise predictor is known in closed form (the quality-vs-steps benchmark, trained-vs-exact comparisons).

Each image is drawn from its index with a generator seeded by (seed, index): the same on every run, process and
worker, so these sets behave like files on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .data import ImageData, seed_of
from .mixture import GaussianMixture

__all__ = ["Synthetic", "Mixture", "COLOURS", "BACKGROUNDS", "RADII"]


# ---------------------------------------------------------------- coloured shapes


COLOURS = ((1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1))  # the shapes', in [-1, 1]
BACKGROUNDS = (-0.8, 0.6)  # the two grey levels behind them
RADII = (0.15, 0.35)  # a shape's radius, as a share of the image side (a square's half side is 0.85 of it)


class Synthetic(ImageData):
    """Coloured discs and squares on plain backgrounds: a sample grid shows at a glance whether a model learned
    them, and diffusion.evaluation.shapes measures it."""

    COLOURS = torch.tensor(COLOURS, dtype=torch.float32)

    def __init__(self, root: str = "", num_images: int = 10000, num_val: int = 256, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.num_images, self.num_val = num_images, num_val

    def build(self) -> tuple[Dataset, Dataset]:
        shapes = _Shapes(self.image_size, self.channels, self.seed)
        val = range(self.num_images, self.num_images + self.num_val)
        return Subset(shapes, range(self.num_images)), Subset(shapes, val)

    def classes(self) -> list[str]:
        return ["disc", "square"]

    def labels(self) -> tuple[Sequence[int], Sequence[int]]:
        """The shape of each image (0: disc, 1: square), drawn as its image draws it."""
        self.setup()
        return tuple(Subset(_ShapeLabels(self.seed), s.indices) for s in (self.train_set, self.val_set))


class _Shapes(Dataset):
    def __init__(self, size: int, channels: int, seed: int) -> None:
        self.size, self.channels, self.seed = size, channels, seed
        axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self.y, self.x = torch.meshgrid(axis, axis, indexing="ij")

    def __getitem__(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(seed_of(self.seed, i))
        u = torch.rand(5, generator=g)  # _ShapeLabels reads u[4], the shape, from the same draw
        colour = Synthetic.COLOURS[torch.randint(len(Synthetic.COLOURS), (1,), generator=g)].view(3, 1, 1)
        background = BACKGROUNDS[0] if u[0] < 0.5 else BACKGROUNDS[1]
        radius = RADII[0] + (RADII[1] - RADII[0]) * u[1]
        cy, cx = radius + (1 - 2 * radius) * u[2], radius + (1 - 2 * radius) * u[3]
        dy, dx = (self.y - cy).abs(), (self.x - cx).abs()
        inside = (dy**2 + dx**2 <= radius**2) if u[4] < 0.5 else (torch.maximum(dy, dx) <= radius * 0.85)
        image = torch.where(inside, colour, torch.full((3, 1, 1), background))
        return image if self.channels == 3 else image.mean(0, keepdim=True).expand(self.channels, -1, -1).clone()


class _ShapeLabels(Dataset):
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __getitem__(self, i: int) -> int:
        return int(torch.rand(5, generator=torch.Generator().manual_seed(seed_of(self.seed, i)))[4] >= 0.5)


# ---------------------------------------------------------------- a Gaussian mixture of images


class Mixture(ImageData):
    """Images from `num_modes` isotropic Gaussians with unequal weights (proportional to 1, 2, ..., K) and
    well-separated means: random +-`contrast` blocks of 4x4 pixels, fixed by the seed. `distribution()` is the
    exact GaussianMixture, so a model trained here can be compared with the optimal noise predictor.

    Flips are off by default: a mirrored sample would not come from the same mixture.
    """

    def __init__(self, root: str = "", num_images: int = 10000, num_val: int = 256, num_modes: int = 6,
                 std: float = 0.1, contrast: float = 0.7, **kwargs) -> None:  # fmt: skip
        kwargs.setdefault("hflip", False)
        super().__init__(root, **kwargs)
        if num_modes < 1 or std < 0 or not 0 < contrast <= 1:
            raise ValueError(f"need num_modes >= 1, std >= 0 and 0 < contrast <= 1; got {num_modes}, {std}, {contrast}")
        self.num_images, self.num_val = num_images, num_val
        self.num_modes, self.std, self.contrast = num_modes, std, contrast

    def distribution(self) -> GaussianMixture:
        """The mixture the images are drawn from (float64): the same for the same config."""
        g = torch.Generator().manual_seed(seed_of(self.seed, 0, 1))  # not (seed, i), which draws image i
        blocks = -(-self.image_size // 4)
        signs = torch.randint(0, 2, (self.num_modes, self.channels, blocks, blocks), generator=g) * 2 - 1
        means = signs.repeat_interleave(4, -1).repeat_interleave(4, -2)[..., : self.image_size, : self.image_size]
        weights = torch.arange(1, self.num_modes + 1, dtype=torch.float64)
        return GaussianMixture(self.contrast * means.double(), weights, self.std)

    def build(self) -> tuple[Dataset, Dataset]:
        images = _MixtureImages(self.distribution(), self.seed)
        val = range(self.num_images, self.num_images + self.num_val)
        return Subset(images, range(self.num_images)), Subset(images, val)

    def classes(self) -> list[str]:
        return [f"mode {k}" for k in range(self.num_modes)]

    def labels(self) -> tuple[Sequence[int], Sequence[int]]:
        """The mode each image was drawn from (one class per mode), drawn as its image draws it."""
        self.setup()
        modes = _MixtureModes(self.distribution(), self.seed)
        return tuple(Subset(modes, s.indices) for s in (self.train_set, self.val_set))


class _MixtureModes(Dataset):
    def __init__(self, mixture: GaussianMixture, seed: int) -> None:
        self.mixture, self.seed = mixture, seed

    def __getitem__(self, i: int) -> int:
        return int(self.mixture.components(1, torch.Generator().manual_seed(seed_of(self.seed, i)))[0])


class _MixtureImages(Dataset):
    def __init__(self, mixture: GaussianMixture, seed: int) -> None:
        self.mixture, self.seed = mixture, seed

    def __getitem__(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(seed_of(self.seed, i))
        return self.mixture.sample(1, generator=g)[0].float()
