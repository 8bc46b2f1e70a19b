"""DataModules on tiny fake datasets in their real on-disk formats, and the resumable training stream."""

from __future__ import annotations

import hashlib
import pickle
import struct
import urllib.error
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.datasets
from hydra.utils import instantiate
from PIL import Image

from diffusion.data import CIFAR10, DataNotFoundError, StreamSampler, UnreadableImageError, shard

from .conftest import compose_config


def datamodule(name: str, tmp_path: Path, *overrides: str):
    """conf/data/<name>.yaml as train.py builds it, in-process loading (num_workers=0), data under tmp_path."""
    cfg = compose_config("train", [f"data={name}", f"paths.data_dir={tmp_path}", "data.num_workers=0", *overrides],
                         tmp_path / "run")  # fmt: skip
    return instantiate(cfg.data)


def first_batches(dm, n: int) -> list[torch.Tensor]:
    return list(islice(iter(dm.train_dataloader()), n))


def identify(x: torch.Tensor, images: torch.Tensor) -> tuple[int, bool]:
    """(i, mirrored) such that x is images[i], mirrored left-right or not; found by content alone."""
    for i, image in enumerate(images):
        for mirrored in (False, True):
            if torch.equal(x, image.flip(-1) if mirrored else image):
                return i, mirrored
    raise AssertionError("the batch holds an image that is not in the dataset")


# ---------------------------------------------------------------- CIFAR-10


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the real CIFAR-10 pickles do: keys read back as b"data" with
    encoding="bytes" and as "data" with encoding="latin1" (torchvision's choice), and numpy's buffer with either."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> list[np.ndarray]:
    """<root>/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta of random images; returns the
    rows [N, 3072] of the five training batches (red plane, green plane, blue plane, each row-major 32x32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, content: dict) -> None:
        with open(folder / name, "wb") as f:
            _Py2Pickler(f, protocol=2).dump(content)

    rows = []
    for b, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        files = [f"image_{b}_{i}.png".encode() for i in range(n)]
        write(name, {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": files})
        rows.append(data)
    names = [s.encode() for s in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    write("batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    return rows[:5]


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> tuple[Path, list[np.ndarray]]:
    """A fake CIFAR-10 under tmp_path/cifar10 that torchvision's own loader accepts.

    torchvision's CIFAR10 compares the md5 of every file with its class attributes train_list, test_list and
    meta (`_check_integrity`, `_load_meta`). We point those attributes at the fake files' md5 sums, so the real
    check still runs (a missing or truncated file would fail it) and nothing in diffusion/ is bypassed."""
    rows = fake_cifar10(tmp_path / "cifar10")
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    tv = torchvision.datasets.CIFAR10
    monkeypatch.setattr(tv, "train_list", [[name, md5[name]] for name, _ in tv.train_list])
    monkeypatch.setattr(tv, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tv, "meta", {**tv.meta, "md5": md5["batches.meta"]})
    return tmp_path, rows


def test_cifar10_reads_the_pickled_batches_as_images_in_minus_one_one(cifar_root):
    tmp_path, rows = cifar_root
    dm = datamodule("cifar10", tmp_path, "data.download=false")
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 20 and len(dm.val_set) == 6
    raw = np.concatenate(rows)
    for i in (0, 7, 19):  # the first, one from data_batch_2, the last
        x = dm.train_set[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
        for c, y, col in [(0, 0, 0), (1, 5, 30), (2, 31, 2)]:  # channel-planar, row-major: 1024 c + 32 y + x
            assert x[c, y, col].item() == pytest.approx(raw[i, 1024 * c + 32 * y + col] / 127.5 - 1, abs=1e-6)
        expected = torch.from_numpy(raw[i].astype(np.float32)).view(3, 32, 32) / 127.5 - 1
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_cifar10_training_batches_follow_the_seeded_stream_with_flips(cifar_root):
    tmp_path, _ = cifar_root
    dm = datamodule("cifar10", tmp_path, "data.download=false", "data.batch_size=5")
    batches = first_batches(dm, 8)
    assert all(b.shape == (5, 3, 32, 32) for b in batches)
    images = torch.stack([dm.train_set[i] for i in range(len(dm.train_set))])
    seen = [identify(x, images) for x in torch.cat(batches)]
    assert sorted(i for i, _ in seen[:20]) == list(range(20)) == sorted(i for i, _ in seen[20:])  # epochs
    flips = [mirrored for _, mirrored in seen]
    assert 0 < sum(flips) < len(flips)
    assert seen == list(islice(StreamSampler(20, seed=0), 40))

    again = first_batches(datamodule("cifar10", tmp_path, "data.download=false", "data.batch_size=5"), 8)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = first_batches(datamodule("cifar10", tmp_path, "data.download=false", "data.batch_size=5", "seed=1"), 8)
    assert [identify(x, images) for x in torch.cat(other)] != seen

    unflipped = datamodule("cifar10", tmp_path, "data.download=false", "data.batch_size=5", "data.hflip=false")
    assert not any(identify(x, images)[1] for x in torch.cat(first_batches(unflipped, 8)))


def test_a_corrupted_cifar10_batch_fails_torchvisions_md5_check_with_our_message(cifar_root):
    tmp_path, _ = cifar_root
    batch = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(DataNotFoundError, match="missing or corrupted"):
        datamodule("cifar10", tmp_path, "data.download=false").setup()


def test_missing_cifar10_without_download_names_the_path_and_the_url(tmp_path):
    dm = datamodule("cifar10", tmp_path, "data.download=false")
    dm.prepare_data()  # nothing to do: download is off
    with pytest.raises(DataNotFoundError, match="data.download=true fetches it") as error:
        dm.setup()
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in str(error.value)
    assert CIFAR10.URL in str(error.value)


def test_a_failed_cifar10_download_names_the_path_and_the_url(tmp_path, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    dm = datamodule("cifar10", tmp_path)
    assert dm.download
    with pytest.raises(DataNotFoundError, match="download failed.*no route to host") as error:
        dm.prepare_data()
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in str(error.value)
    assert CIFAR10.URL in str(error.value)


# ---------------------------------------------------------------- CelebA

TOP, LEFT, BOX = 57, 25, 128  # the DDIM paper's crop of the 178x218 aligned faces
QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # inside the box: TL, TR, BL, BR
OUTSIDE = (255, 0, 255)


def fake_celeba(root: Path, partitions: list[int]) -> None:
    """<root>/celeba/img_align_celeba/000001.jpg ... (178 wide, 218 high) and list_eval_partition.txt."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    pixels = np.full((218, 178, 3), OUTSIDE, np.uint8)
    half = BOX // 2
    for k, colour in enumerate(QUADRANTS):
        top, left = TOP + half * (k // 2), LEFT + half * (k % 2)
        pixels[top : top + half, left : left + half] = colour
    lines = []
    for i, split in enumerate(partitions, start=1):
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=95, subsampling=0)
        lines.append(f"{i:06d}.jpg {split}\n")
    (root / "celeba" / "list_eval_partition.txt").write_text("".join(lines))


def test_celeba_takes_the_ddim_crop_resized_to_64(tmp_path):
    fake_celeba(tmp_path, [0, 0, 0, 1, 1, 2])
    dm = datamodule("celeba", tmp_path, "data.batch_size=2")
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (3, 2)  # partition 2 (test) is not used
    x = dm.val_set[0]
    assert x.shape == (3, 64, 64) and -1 <= x.min() and x.max() <= 1
    expected = torch.zeros(3, 64, 64)  # the box's four solid quadrants, nothing of the outside colour
    for k, colour in enumerate(QUADRANTS):
        top, left = 32 * (k // 2), 32 * (k % 2)
        expected[:, top : top + 32, left : left + 32] = torch.tensor(colour).view(3, 1, 1) / 127.5 - 1
    error = (x - expected).abs()
    # JPEG blurs the solid edges a little; a crop one pixel off would bring the outside colour into one whole
    # border row or column of the output (mean error about 0.3 there, against 0.01 here)
    assert error.mean() < 0.03
    for side in (error[:, 0], error[:, -1], error[:, :, 0], error[:, :, -1]):
        assert side.mean() < 0.05
    (batch,) = first_batches(dm, 1)
    assert batch.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("missing", ["folder", "partition", "both"])
def test_missing_celeba_names_the_files_to_put_where(tmp_path, missing):
    fake_celeba(tmp_path, [0, 1])
    if missing in ("folder", "both"):
        for p in (tmp_path / "celeba" / "img_align_celeba").iterdir():
            p.unlink()
        (tmp_path / "celeba" / "img_align_celeba").rmdir()
    if missing in ("partition", "both"):
        (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataNotFoundError) as error:
        datamodule("celeba", tmp_path).setup()
    message = str(error.value)
    assert str(tmp_path / "celeba" / "img_align_celeba") in message
    assert str(tmp_path / "celeba" / "list_eval_partition.txt") in message


def test_an_image_listed_in_the_partition_but_missing_is_named(tmp_path):
    fake_celeba(tmp_path, [0, 1])
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    dm = datamodule("celeba", tmp_path)
    dm.setup()
    with pytest.raises(DataNotFoundError, match="000002.jpg is listed but missing"):
        dm.val_set[0]


# ---------------------------------------------------------------- a folder of images


def test_image_folder_centre_crops_every_size_to_image_size(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    # a 48x16 image: its shortest side is already 16, so the centre crop keeps exactly the middle third (green)
    strip = np.zeros((16, 48, 3), np.uint8)
    strip[:, 16:32] = (0, 255, 0)
    Image.fromarray(strip).save(folder / "wide.png")
    Image.fromarray(np.full((40, 24, 3), 255, np.uint8)).save(folder / "sub" / "tall.png")  # found recursively
    Image.fromarray(np.full((20, 20), 0, np.uint8), mode="L").save(folder / "grey.png")  # converted to RGB
    (folder / "notes.txt").write_text("not an image")
    dm = datamodule("folder", tmp_path, f"data.root={folder}", "data.image_size=16", "data.batch_size=2")
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 3 and len(dm.val_set) == 1
    images = {dm.train_set.paths[i].name: dm.train_set[i] for i in range(2)}
    images |= {dm.val_set.paths[0].name: dm.val_set[0]}
    assert all(x.shape == (3, 16, 16) for x in images.values())
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    assert torch.equal(images["wide.png"], green)
    assert torch.equal(images["tall.png"], torch.ones(3, 16, 16))
    assert torch.equal(images["grey.png"], -torch.ones(3, 16, 16))
    (batch,) = first_batches(dm, 1)
    assert batch.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("count", [0, 1])
def test_image_folder_with_fewer_than_two_images_says_so(tmp_path, count):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(DataNotFoundError, match=f"found {count} images in {folder}.*at least two"):
        datamodule("folder", tmp_path, f"data.root={folder}").setup()


# ---------------------------------------------------------------- corrupt files


def spoil(path: Path, how: str) -> None:
    """Turn an image file into a broken one: cut to half its bytes, or replaced by text."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("<html>404 Not Found</html>")  # what a failed scripted download often saves


def read_everything(dm, num_workers: int) -> None:
    """Load every training and validation image through the DataLoaders, in worker processes if num_workers > 0."""
    dm.num_workers = num_workers
    dm.setup()
    dm.batch_size = len(dm.train_set)  # the first batch holds the whole first epoch
    next(iter(dm.train_dataloader()))
    list(dm.val_dataloader())


def assert_names(error: pytest.ExceptionInfo, path: Path) -> None:
    """The user reads one line that starts with the file and says what to do: no worker traceback, no PIL frames."""
    message = str(error.value)
    assert message.startswith(f"{path} cannot be read as an image"), message
    assert "Replace it with an intact copy" in message and "delete it" in message
    assert "\n" not in message and "Traceback" not in message and "Caught" not in message


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("name, how", [("b.jpg", "truncated"), ("b.png", "truncated"), ("b.jpg", "text")])
def test_a_broken_file_in_an_image_folder_is_named_even_from_a_worker(tmp_path, name, how, num_workers):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for stem in "acd":
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(folder / f"{stem}.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(folder / name)
    dm = datamodule("folder", tmp_path, f"data.root={folder}", "data.image_size=16")
    read_everything(dm, num_workers)  # intact, it loads
    spoil(folder / name, how)
    dm = datamodule("folder", tmp_path, f"data.root={folder}", "data.image_size=16")
    with pytest.raises(UnreadableImageError) as error:
        read_everything(dm, num_workers)
    assert_names(error, folder / name)


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("how", ["truncated", "text"])
def test_a_broken_celeba_image_is_named_even_from_a_worker(tmp_path, how, num_workers):
    fake_celeba(tmp_path, [0, 0, 1, 1])
    broken = tmp_path / "celeba" / "img_align_celeba" / "000004.jpg"  # a validation image
    spoil(broken, how)
    with pytest.raises(UnreadableImageError) as error:
        read_everything(datamodule("celeba", tmp_path), num_workers)
    assert_names(error, broken)


def test_a_transforms_own_error_is_not_blamed_on_the_file(tmp_path):
    """Only decoding failures become UnreadableImageError; a bug after decoding keeps its type and traceback."""
    fake_celeba(tmp_path, [0, 1])
    dm = datamodule("celeba", tmp_path)
    dm.setup()

    def buggy(image):
        raise ValueError("a bug in the transform")

    dm.val_set.transform = buggy
    with pytest.raises(ValueError, match="a bug in the transform"):
        dm.val_set[0]


# ---------------------------------------------------------------- validation shards under DDP


@pytest.mark.parametrize("world_size", range(1, 9))
def test_every_rank_gets_as_many_validation_items_as_the_others_and_all_are_scored(world_size):
    """For every split size 0..20: equal shares (so equal batch counts, whatever the batch size), every item in
    some shard, and the fewest repeats that equal shares allow (the total is the first multiple of W >= n)."""
    for n in range(21):
        shards = [shard(n, rank, world_size) for rank in range(world_size)]
        assert len({len(s) for s in shards}) == 1, (n, shards)
        flat = [i for s in shards for i in s]
        assert set(flat) == set(range(n)), (n, shards)
        assert len(flat) % world_size == 0 and n <= len(flat) < n + world_size, (n, shards)


def test_one_validation_image_gives_every_rank_one_batch(tmp_path):
    lengths = []
    for rank in (0, 1):
        dm = datamodule("synthetic", tmp_path, "data.num_images=8", "data.num_val=1")
        dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, world_size=2, global_rank=rank)
        lengths.append(len(dm.val_dataloader()))
    assert lengths == [1, 1]


# A real two-process run with one validation image: tests/test_fsdp.py (data.num_val=1 under trainer=cpu_fsdp and
# cpu_ddp), which runs the multi-process training anyway.


# ---------------------------------------------------------------- synthetic shapes


def test_synthetic_images_are_a_function_of_the_seed(tmp_path):
    def images(*overrides: str) -> torch.Tensor:
        dm = datamodule("synthetic", tmp_path, "data.num_images=8", "data.num_val=2", *overrides)
        dm.setup()
        assert (len(dm.train_set), len(dm.val_set)) == (8, 2)
        return torch.stack([dm.train_set[i] for i in range(8)])

    x = images()
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert all(len(image.unique()) >= 2 for image in x)  # a shape on a background, not a blank image
    assert torch.equal(x, images())
    assert not torch.equal(x, images("seed=1"))
    assert images("data.channels=1", "data.image_size=16").shape == (8, 1, 16, 16)


# ---------------------------------------------------------------- the resumable stream


def stream(n: int, seed: int = 3, count: int = 40, **kwargs) -> list[tuple[int, bool]]:
    return list(islice(StreamSampler(n, seed, **kwargs), count))


def test_each_epoch_of_the_stream_is_a_permutation_and_differs_from_the_last():
    s = stream(7, count=21)
    epochs = [s[k : k + 7] for k in (0, 7, 14)]
    assert all(sorted(i for i, _ in e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert not any(flip for _, flip in stream(7, flip=False))


@pytest.mark.parametrize("start", [1, 6, 7, 23])
def test_the_stream_from_a_position_is_the_tail_of_the_stream_from_zero(start):
    assert stream(7, start=start) == stream(7, count=40 + start)[start:]


@pytest.mark.parametrize("start", [0, 5, 8])
def test_two_ranks_interleave_into_the_single_process_stream(start):
    ranks = [stream(7, start=start, rank=r, world_size=2, count=20) for r in (0, 1)]
    first = start % 2  # the rank that owns position `start`
    merged = [item for pair in zip(ranks[first], ranks[1 - first], strict=True) for item in pair]
    assert merged == stream(7, start=start, count=40)


def test_a_resumed_rank_loads_the_batches_an_uninterrupted_run_would(tmp_path):
    """After 3 steps on 2 ranks with batch 4, 24 images are consumed: rank 1 goes on from stream position 25."""
    whole = torch.cat(first_batches(datamodule("synthetic", tmp_path, "data.num_images=10", "data.batch_size=4"), 12))
    dm = datamodule("synthetic", tmp_path, "data.num_images=10", "data.batch_size=4")
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=1, world_size=2, global_rank=1)
    resumed = torch.cat(first_batches(dm, 2))
    assert torch.equal(resumed, whole[25:41:2])


def test_mixture_images_follow_their_distribution(tmp_path):
    """The images are draws from `distribution()`: their mean and the share nearest to each mode match it."""
    data = instantiate(compose_config("train", ["data=mixture", "data.num_images=3000"], tmp_path).data)
    data.setup()
    mixture = data.distribution()
    images = torch.stack([data.train_set[i] for i in range(3000)]).double()
    assert images.shape == (3000, 3, 16, 16) and data.hflip is False
    assert mixture.mode_weight_error(images) < 0.03
    mean, cov = mixture.moments()
    assert (images.flatten(1).mean(0) - mean).abs().max() < 0.1
    floor = mixture.frechet(mixture.sample(3000, torch.Generator().manual_seed(1)))  # exact draws, same count
    assert mixture.frechet(images) < 2 * floor < mixture.frechet(1.1 * images)
    assert mixture.frechet(images.flip(-1)) > 100 * floor  # flips would leave the mixture
    again = instantiate(compose_config("train", ["data=mixture"], tmp_path).data).distribution()
    assert torch.equal(again.means, mixture.means) and torch.equal(again.weights, mixture.weights)
