"""Class labels from every dataset, in its real on-disk format, and train.py conditional=true.

Each check compares a label with what the image itself shows or what the file says: CIFAR-10's pickled `labels`, a
folder's class sub-folder, CelebA's attribute column, the synthetic image's shape, the mixture mode nearest the
image. The labels travel with the resumable stream, so a resumed run reads the labels an uninterrupted one would.
"""

from __future__ import annotations

import pickle
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data import DataNotFoundError, StreamSampler
from diffusion.errors import UsageError
from diffusion.io import checkpoints
from diffusion.training.losses import drop_labels
from diffusion.unet import UNet
from train import train

from .conftest import TINY_RUN, compose_config
from .test_data import cifar_root, datamodule, fake_celeba  # noqa: F401 (cifar_root: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(dm, n: int) -> list:
    return list(islice(iter(dm.train_dataloader()), n))


def test_cifar10_labels_are_the_pickled_ones(cifar_root):  # noqa: F811
    tmp_path, _ = cifar_root
    dm = datamodule("cifar10", tmp_path, "data.download=false", "+data.conditional=true", "data.batch_size=4")
    assert dm.classes()[3] == "cat" and dm.num_classes == 10
    dm.setup()
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    truth = []  # the pickles' own b"labels", read here without torchvision
    for k in range(1, 6):
        with open(folder / f"data_batch_{k}", "rb") as f:
            truth += pickle.load(f, encoding="bytes")[b"labels"]
    for x, y in batches(dm, 3):
        for image, label in zip(x, y, strict=True):
            i = next(i for i in range(len(dm.train_set)) if torch.equal(dm.train_set[i], image)
                     or torch.equal(dm.train_set[i].flip(-1), image))  # fmt: skip
            assert int(label) == truth[i]


def test_a_folders_classes_are_its_sub_folders(tmp_path):
    for k, name in enumerate(["cats", "dogs", "owls"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 60 * k, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    dm = datamodule("folder", tmp_path, f"data.root={tmp_path / 'imgs'}", "data.image_size=8", "data.batch_size=5",
                    "+data.conditional=true", "data.val_fraction=0.2")  # fmt: skip
    assert dm.classes() == ["cats", "dogs", "owls"]
    for x, y in batches(dm, 4):  # the grey level says the class
        assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5 / 60).round().long(), y)


def test_a_folder_without_class_sub_folders_is_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.png")
    dm = datamodule("folder", tmp_path, f"data.root={tmp_path}", "+data.conditional=true")
    with pytest.raises(DataNotFoundError, match="one sub-folder per class"):
        dm.classes()


def test_celeba_labels_are_the_chosen_attribute(tmp_path):
    fake_celeba(tmp_path, [0, 0, 0, 0, 1, 1])
    smiling = [1, -1, -1, 1, 1, -1]
    rows = [f"{i:06d}.jpg {s} {-s}" for i, s in enumerate(smiling, start=1)]
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("\n".join(["6", "Smiling Male", *rows]) + "\n")
    dm = datamodule("celeba", tmp_path, "+data.conditional=true", "data.attribute=Smiling")
    assert dm.classes() == ["not Smiling", "Smiling"]
    train_labels, val_labels = dm.labels()
    assert list(train_labels) == [1, 0, 0, 1] and list(val_labels) == [1, 0]
    with pytest.raises(UsageError, match="data.attribute='Smiles' is not a CelebA attribute: choose one of Smiling"):
        datamodule("celeba", tmp_path, "+data.conditional=true", "data.attribute=Smiles").labels()
    with pytest.raises(Exception, match="pass data.attribute=NAME"):  # Hydra's InstantiationException around it
        datamodule("celeba", tmp_path, "+data.conditional=true")


def test_synthetic_labels_are_the_shape_each_image_shows(tmp_path):
    from diffusion.synthetic import BACKGROUNDS

    dm = datamodule("synthetic", tmp_path, "+data.conditional=true", "data.image_size=32", "data.num_images=64")
    dm.setup()
    train_labels, _ = dm.labels()
    for i in range(40):
        image = dm.train_set[i]
        grey = [(image == level).all(0) for level in BACKGROUNDS]  # the background: one grey level on all channels
        inside = ~max(grey, key=lambda m: int(m.sum()))  # the shape's pixels: saturated colours, never grey
        rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        square = inside.sum().item() >= 0.97 * box.item()  # a square fills its bounding box, a disc ~pi/4 of it
        assert int(square) == train_labels[i]


def test_mixture_labels_are_the_mode_each_image_was_drawn_from(tmp_path):
    dm = datamodule("mixture", tmp_path, "+data.conditional=true", "data.num_images=200")
    dm.setup()
    mixture = dm.distribution()
    train_labels, val_labels = dm.labels()
    images = torch.stack([dm.train_set[i] for i in range(200)])
    assert torch.equal(mixture.nearest_mode(images), torch.tensor([train_labels[i] for i in range(200)]))
    assert len(set(train_labels[i] for i in range(200))) == dm.num_classes == 6
    val = torch.stack([dm.val_set[i] for i in range(20)])
    assert torch.equal(mixture.nearest_mode(val), torch.tensor([val_labels[i] for i in range(20)]))


def test_labelled_batches_follow_the_resumable_stream(tmp_path):
    """The stream from position p, labels and all, is the tail of the stream from 0."""
    dm = datamodule("mixture", tmp_path, "+data.conditional=true", "data.num_images=50", "data.batch_size=5")
    whole = batches(dm, 6)
    dm.trainer = None
    later = datamodule("mixture", tmp_path, "+data.conditional=true", "data.num_images=50", "data.batch_size=5")
    later.setup()
    train_set = later._sets()[0]
    sampler = StreamSampler(len(train_set), later.seed, start=15, flip=later.hflip)
    tail = [train_set[i] for i, _ in islice(iter(sampler), 15)]
    assert [int(y) for _, y in tail] == torch.cat([y for _, y in whole[3:]]).tolist()


def test_unconditional_data_yields_images_alone(tmp_path):
    dm = datamodule("mixture", tmp_path, "data.num_images=20", "data.batch_size=4")
    (x,) = batches(dm, 1)
    assert isinstance(x, torch.Tensor) and x.shape == (4, 3, 16, 16)


# ---------------------------------------------------------------- the network and the training step


def test_the_class_embedding_joins_the_time_embedding_with_a_no_label_row():
    torch.manual_seed(0)
    net = UNet(3, 3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, norm_groups=8,
               num_classes=4).eval()  # fmt: skip
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    for p in net.parameters():  # zero-initialised branches would hide the label
        p.data.add_(0.05 * torch.randn_like(p))
    null = net(x, t, torch.tensor([4, 4]))
    assert torch.equal(net(x, t), null)  # y=None is "no label"
    assert not torch.allclose(net(x, t, torch.tensor([0, 1])), null)
    assert not torch.allclose(net(x, t, torch.tensor([0, 0]))[1], net(x, t, torch.tensor([1, 1]))[1])
    plain = UNet(3, 3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, norm_groups=8)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes must be None"):
        UNet(num_classes=0)


def test_label_dropout_drops_the_asked_share_and_keeps_the_rest():
    y = torch.arange(20000) % 7
    dropped = drop_labels(y, 0.1, 7, torch.Generator().manual_seed(0))
    share = (dropped == 7).float().mean().item()
    assert abs(share - 0.1) < 0.01
    kept = dropped != 7
    assert torch.equal(dropped[kept], y[kept])
    assert torch.equal(drop_labels(y, 0.0, 7), y) and (drop_labels(y, 1.0, 7) == 7).all()


def test_conditional_training_records_its_classes_and_resumes(tmp_path):
    module = train(compose_config("train", [*TINY_RUN, "conditional=true", "trainer.max_steps=3"], tmp_path / "a"))
    assert module.num_classes == 2 and module.model.class_embed.num_embeddings == 3
    config = checkpoints.load(tmp_path / "a" / "checkpoints" / "last.ckpt")["config"]
    assert config["conditional"] is True and config["model"]["num_classes"] == 2
    assert config["classes"] == ["disc", "square"] and config["data"]["conditional"] is True
    resumed = train(compose_config("train", [f"resume={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                                             "trainer.max_steps=5", "logger=csv"], tmp_path / "b"))  # fmt: skip
    assert resumed.global_step == 5 and resumed.num_classes == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+model.num_classes=3"], r"model.num_classes=3 with conditional=false: pass conditional=true"),
        (["conditional=true", "+model.num_classes=3"], "model.num_classes has 3 classes, but the data has 2"),
        (["conditional=true", "module.cond_drop=1.5"], r"module.cond_drop=1.5 must lie in \[0, 1\]"),
    ],
)
def test_bad_conditional_runs_are_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(UsageError, match=message) as error:
        train(compose_config("train", [*TINY_RUN, *overrides], tmp_path))
    assert "\n" not in str(error.value)
