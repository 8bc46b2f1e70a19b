"""DataModules for image files: CIFAR-10, CelebA 64x64, a folder of images (built-in data: diffusion.synthetic).

Every module yields image batches [B, C, H, W] in [-1, 1]; with `conditional=True`, (images, labels int64 [B])
pairs, the labels from `labels()` (CIFAR-10's classes, a folder's class sub-folders, a CelebA attribute, the
built-in shape or mixture mode). Training reads an endless stream whose order (and flips) depend only on the seed
and the position in the stream, so a resumed run picks up exactly where it stopped, on any number of processes,
labels and all.
"""

from __future__ import annotations

import math
import urllib.error
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .errors import UsageError

__all__ = ["DataNotFoundError", "UnreadableImageError", "StreamSampler", "ImageData", "CIFAR10", "CelebA",
           "ImageFolder", "seed_of", "shard"]  # fmt: skip

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class _OneLine(UsageError):
    """Keeps its own one-line message when a DataLoader worker raised it: torch re-raises a worker's error as
    `type(error)("Caught ... Original Traceback ...")`, whose last line is ours, after the class name."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__} ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class DataNotFoundError(_OneLine):
    """A dataset's files are not where the config says they are."""


class UnreadableImageError(_OneLine):
    """An image file that cannot be decoded: truncated, corrupt, or not an image at all."""


def seed_of(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers, so (seed, epoch) and (seed, index) streams never collide."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s validation items out of n: every rank gets ceil(n / world_size) of them (positions rank,
    rank + W, ... wrapping around to repeat the first few), so all ranks run the same number of batches and reach
    each sync_dist all-reduce together; a rank with fewer would leave the others waiting (or Lightning refuses)."""
    return [(rank + k * world_size) % n for k in range(-(-n // world_size))]


def _to_tensor(image: Image.Image) -> Tensor:
    return TF.to_tensor(image) * 2 - 1  # [0, 1] -> [-1, 1]


# ---------------------------------------------------------------- the resumable stream


class StreamSampler(Sampler):
    """Endless (index, flip) pairs: position p of the global stream is element p % n of epoch p // n's
    permutation; rank r of `world_size` takes positions r, r + W, r + 2W, ... from `start` on."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0, flip: bool = True):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.seed, self.rank, self.world_size, self.flip = n, seed, rank, world_size, flip
        self.start = start + (rank - start) % world_size  # the first position >= start that is this rank's

    def _epoch(self, epoch: int) -> tuple[list[int], list[bool]]:
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)
        flips = torch.randint(0, 2, (self.n,), generator=g).bool() & self.flip
        return perm.tolist(), flips.tolist()

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        p, epoch, (perm, flips) = self.start, self.start // self.n, self._epoch(self.start // self.n)
        while True:
            e, j = divmod(p, self.n)
            if e != epoch:
                epoch, (perm, flips) = e, self._epoch(e)
            yield perm[j], flips[j]
            p += self.world_size


class _Flipped(Dataset):
    """Training view of a dataset: item (i, flip) is image i (or its (image, label) pair), mirrored left-right when
    flip is set."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __getitem__(self, key: tuple[int, bool]) -> Tensor | tuple[Tensor, int]:
        i, flip = key
        item = self.images[i]
        if isinstance(item, tuple):
            return (item[0].flip(-1) if flip else item[0], item[1])
        return item.flip(-1) if flip else item


class _Labelled(Dataset):
    """(image i, label i) pairs from a dataset of images and a sequence of labels aligned with it."""

    def __init__(self, images: Dataset, labels: Sequence[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------- the shared DataModule


class ImageData(L.LightningDataModule):
    """Loaders shared by every dataset; subclasses only say how to build the train and validation sets.

    Args:
        root: where the files are.
        batch_size: per process.
        hflip: random horizontal flips for training (drawn from the stream, so resuming replays them).
        conditional: yield (images, labels) batches (train.py conditional=true sets it).
    """

    def __init__(self, root: str, image_size: int, channels: int = 3, batch_size: int = 128, num_workers: int = 4,
                 seed: int = 0, hflip: bool = True, conditional: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.root, self.image_size, self.channels = Path(root), image_size, channels
        self.batch_size, self.num_workers, self.seed, self.hflip = batch_size, num_workers, seed, hflip
        self.conditional = bool(conditional)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def classes(self) -> list[str]:
        """The class names, label k naming class k (a dataset without labels refuses conditional training)."""
        raise UsageError(f"{type(self).__name__} has no class labels to train on: drop conditional=true")

    def labels(self) -> tuple[Sequence[int], Sequence[int]]:
        """The labels of the built training and validation sets, aligned with their images."""
        raise UsageError(f"{type(self).__name__} has no class labels to train on: drop conditional=true")

    @property
    def num_classes(self) -> int:
        return len(self.classes())

    def _sets(self) -> tuple[Dataset, Dataset]:
        """The training and validation sets as the loaders read them: images, or (image, label) pairs."""
        self.setup()
        if not self.conditional:
            return self.train_set, self.val_set
        train, val = self.labels()
        return _Labelled(self.train_set, train), _Labelled(self.val_set, val)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build()

    def _placement(self) -> tuple[int, int, int]:
        """(rank, world size, images already consumed by all ranks together) from the attached trainer."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        consumed = trainer.global_step * trainer.accumulate_grad_batches * self.batch_size * trainer.world_size
        return trainer.global_rank, trainer.world_size, consumed

    def train_dataloader(self) -> DataLoader:
        train, _ = self._sets()
        rank, world, consumed = self._placement()
        sampler = StreamSampler(len(train), self.seed, rank, world, start=consumed, flip=self.hflip)
        return self._loader(_Flipped(train), sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        _, val = self._sets()
        rank, world, _ = self._placement()
        # Equal shards (up to world - 1 images scored twice); the logged loss is averaged across ranks.
        return self._loader(Subset(val, shard(len(val), rank, world)))

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )


# ---------------------------------------------------------------- CIFAR-10


class CIFAR10(ImageData):
    """torchvision's CIFAR-10 at 32x32: the 50k training images, the 10k test images for the validation loss."""

    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def __init__(self, root: str, download: bool = True, **kwargs) -> None:
        super().__init__(root, **kwargs)
        if self.image_size != 32 or self.channels != 3:
            raise ValueError(
                f"CIFAR-10 images are 32x32 RGB, but data.image_size={self.image_size} and data.channels="
                f"{self.channels}: leave both at their defaults (use data=folder to resize images of your own)"
            )
        self.download = download

    def _missing(self, why: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"CIFAR-10 is not in {self.root / 'cifar-10-batches-py'} ({why}). Download {self.URL}, extract it "
            f"into {self.root}/ (it unpacks to cifar-10-batches-py/), or point data.root (or DIFFUSION_DATA) at a "
            "folder that has it."
        )

    def prepare_data(self) -> None:
        from torchvision.datasets import CIFAR10 as TorchCIFAR10

        if (self.root / "cifar-10-batches-py").is_dir() or not self.download:
            return
        try:
            TorchCIFAR10(str(self.root), train=True, download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise self._missing(f"the download failed: {error}") from None

    def build(self) -> tuple[Dataset, Dataset]:
        from torchvision.datasets import CIFAR10 as TorchCIFAR10

        try:
            train, test = (TorchCIFAR10(str(self.root), train=split, transform=_to_tensor) for split in (True, False))
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"; its hint names its own argument
            hint = "" if self.download else "; data.download=true fetches it"
            raise self._missing(f"missing or corrupted{hint}") from None
        return _Images(train), _Images(test)

    CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def classes(self) -> list[str]:
        return list(self.CLASSES)

    def labels(self) -> tuple[Sequence[int], Sequence[int]]:
        self.setup()
        return self.train_set.labelled.targets, self.val_set.labelled.targets


class _Images(Dataset):
    """Drops the labels of an (image, label) dataset."""

    def __init__(self, labelled: Dataset) -> None:
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, i: int) -> Tensor:
        return self.labelled[i][0]


# ---------------------------------------------------------------- CelebA


class CelebA(ImageData):
    """CelebA aligned faces at 64x64 with the DDIM paper's preprocessing: the 128x128 box at top 57, left 25,
    resized. Reads `<root>/celeba/img_align_celeba/` and `<root>/celeba/list_eval_partition.txt`, the layout
    torchvision uses, without its other annotation files (partition 0 trains, 1 validates).

    A truncated or corrupt image stops training with an UnreadableImageError naming it, as in ImageFolder.

    Conditional training (conditional=true) conditions on one of the 40 attributes of `list_attr_celeba.txt`
    (beside the partition file), chosen by `attribute` (e.g. Smiling): label 1 where the image has it, 0 where not."""

    PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

    def __init__(self, root: str, attribute: str | None = None, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.attribute = attribute
        if self.conditional and not attribute:
            raise ValueError("conditional CelebA conditions on one attribute: pass data.attribute=NAME (e.g. Smiling, "
                             "Male, Eyeglasses: a column of list_attr_celeba.txt)")  # fmt: skip

    def classes(self) -> list[str]:
        return [f"not {self.attribute}", str(self.attribute)]

    def labels(self) -> tuple[Sequence[int], Sequence[int]]:
        self.setup()
        path = self.root / "celeba" / "list_attr_celeba.txt"
        if not path.is_file():
            raise DataNotFoundError(f"conditional CelebA reads its attributes from {path}: get list_attr_celeba.txt "
                                    f"from {self.PAGE} and put it beside list_eval_partition.txt")  # fmt: skip
        lines = [line.split() for line in path.read_text().split("\n")[1:] if line.strip()]
        names = lines[0]
        if self.attribute not in names:
            raise UsageError(f"data.attribute={self.attribute!r} is not a CelebA attribute: choose one of "
                             f"{', '.join(names)}")  # fmt: skip
        column = names.index(self.attribute) + 1  # after the file name
        has = {row[0]: int(row[column]) > 0 for row in lines[1:]}
        try:
            return tuple([int(has[p.name]) for p in files.paths] for files in (self.train_set, self.val_set))
        except KeyError as missing:
            raise DataNotFoundError(f"{path} has no row for {missing}: is the file complete?") from None

    def build(self) -> tuple[Dataset, Dataset]:
        folder, partition = self.root / "celeba" / "img_align_celeba", self.root / "celeba" / "list_eval_partition.txt"
        if not folder.is_dir() or not partition.is_file():
            raise DataNotFoundError(
                f"CelebA is not in {self.root / 'celeba'}: it needs the folder {folder}/ (000001.jpg ...) and the "
                f"file {partition}. Get img_align_celeba.zip and list_eval_partition.txt from {self.PAGE} (its "
                "Google Drive often refuses scripted downloads: use a browser), unzip the images there, and put the "
                "partition file beside the folder; or point data.root (or DIFFUSION_DATA) elsewhere."
            )
        splits: dict[int, list[Path]] = {0: [], 1: [], 2: []}
        for line in partition.read_text().split("\n"):
            if line.strip():
                name, split = line.split()
                splits[int(split)].append(folder / name)
        return _Files(splits[0], self._transform), _Files(splits[1], self._transform)

    def _transform(self, image: Image.Image) -> Tensor:
        image = TF.crop(image.convert("RGB"), 57, 25, 128, 128)
        return _to_tensor(TF.resize(image, [self.image_size] * 2, antialias=True))


class _Files(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        with _decoded(self.paths[i]) as image:
            return self.transform(image)


@contextmanager
def _decoded(path: Path) -> Iterator[Image.Image]:
    """The image at `path`, decoded; a missing or undecodable file stops training with its path and the fix."""
    try:
        image = Image.open(path)
        image.load()  # decode here, so a transform's own errors are not blamed on the file
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} is listed but missing: is the dataset complete?") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # what PIL raises for truncated or foreign bytes
        raise UnreadableImageError(
            f"{path} cannot be read as an image ({type(error).__name__}: {error}). Replace it with an intact copy "
            "(re-extract or re-download the dataset), or, in a folder of your own (data=folder), delete it."
        ) from None
    with image:
        yield image


# ---------------------------------------------------------------- a folder of images


class ImageFolder(ImageData):
    """Every image below `root` (png, jpg, webp, bmp), resized and centre-cropped to image_size; a fixed,
    seeded `val_fraction` of the files is held out for the validation loss.

    A file that cannot be decoded stops training with an UnreadableImageError naming it, not skipped: skipping
    would silently shrink the dataset and shift the resumable stream, and a bad file means an incomplete copy.

    Conditional training (conditional=true) reads the classes as torchvision's ImageFolder does: each sub-folder
    of `root` is a class, label k the k-th in sorted order, and every image must lie inside one."""

    def __init__(self, root: str, val_fraction: float = 0.01, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.val_fraction = val_fraction

    def classes(self) -> list[str]:
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        if len(found) < 2:
            raise DataNotFoundError(f"conditional data=folder needs one sub-folder per class in {self.root}, and "
                                    f"found {len(found)}: put each class's images in root/<class name>/")  # fmt: skip
        return found

    def labels(self) -> tuple[Sequence[int], Sequence[int]]:
        self.setup()
        index = {name: k for k, name in enumerate(self.classes())}
        labelled = []
        for files in (self.train_set, self.val_set):
            rows = []
            for path in files.paths:
                top = path.relative_to(self.root).parts[0]
                if top not in index:
                    raise UsageError(f"{path} lies in no class sub-folder of {self.root}: move it into one, or "
                                     "train without conditional=true")  # fmt: skip
                rows.append(index[top])
            labelled.append(rows)
        return labelled[0], labelled[1]

    def build(self) -> tuple[Dataset, Dataset]:
        paths = (
            sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if self.root.is_dir() else []
        )
        if len(paths) < 2:
            raise DataNotFoundError(
                f"found {len(paths)} images in {self.root}: data=folder needs a folder with at least two images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}, searched recursively); pass data.root=/path/to/images"
            )
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, math.floor(self.val_fraction * len(paths)))
        shuffled = [paths[i] for i in order]
        return _Files(shuffled[n_val:], self._transform), _Files(shuffled[:n_val], self._transform)

    def _transform(self, image: Image.Image) -> Tensor:
        image = TF.resize(image.convert("RGB" if self.channels == 3 else "L"), self.image_size, antialias=True)
        return _to_tensor(TF.center_crop(image, [self.image_size] * 2))
