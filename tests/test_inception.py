"""The FID feature extractor: grey and bad images, where the Inception weights are looked up, and the message when
they are missing offline."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.errors import UsageError
from diffusion.evaluation import inception
from diffusion.evaluation.inception import WeightsNotFoundError

from .test_metrics import OPTIONS, StandIn


def test_grey_images_are_fed_as_rgb_and_bad_images_are_named():
    net = StandIn(pixels=4 * 4 * 3)
    grey = np.random.default_rng(5).integers(0, 256, (4, 4, 4, 1), dtype=np.uint8)
    features = inception.inception_features(grey, extractor=net, **OPTIONS)
    np.testing.assert_allclose(features, inception.inception_features(grey.repeat(3, -1), extractor=net, **OPTIONS))
    with pytest.raises(ValueError, match="uint8"):
        inception.inception_features(grey.astype(np.float32), extractor=net, **OPTIONS)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        inception.inception_features(grey.transpose(0, 3, 1, 2).repeat(3, 1), extractor=net, **OPTIONS)


# ---------------------------------------------------------------- the Inception weights


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder, no DIFFUSION_FID_WEIGHTS, and a network that fails like an offline one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    timeouts = []

    def offline(url, timeout=None, **kwargs):
        timeouts.append(timeout)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tmp_path / "torch" / "hub" / "checkpoints", timeouts


def test_missing_weights_offline_say_which_file_goes_where(hub):
    checkpoints, timeouts = hub
    with pytest.raises(WeightsNotFoundError) as error:
        inception.Inception()
    message = str(error.value)
    assert isinstance(error.value, UsageError) and "\n" not in message
    assert inception.WEIGHTS_URL in message and "download failed" in message
    assert str(checkpoints / "weights-inception-2015-12-05-6726825d.pth") in message
    assert inception.WEIGHTS_ENV in message
    assert timeouts and 0 < timeouts[0] <= 60  # one short try, never a hang
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no partial file left behind


def test_weights_env_var_and_pytorch_fid_name(hub, tmp_path, monkeypatch):
    checkpoints, timeouts = hub
    checkpoints.mkdir(parents=True)
    (checkpoints / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")
    assert inception.weights_path() == checkpoints / "pt_inception-2015-12-05-6726825d.pth" and not timeouts
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(WeightsNotFoundError, match=f"{inception.WEIGHTS_ENV}=.*nowhere.pth is not a file"):
        inception.weights_path()


def test_inception_loads_weights_in_the_fid_layout(tmp_path, monkeypatch):
    """The real network with random weights in the released file's layout (torchvision's Inception3 names, 1008
    classes): uint8 images of any size -> [B, 2048]; a corrupt file is named."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "weights.pth"
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict(), path)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", sha256(path))  # these random weights stand for the real ones
    net = inception.Inception()
    images = np.random.default_rng(6).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    features = inception.inception_features(images, extractor=net, **OPTIONS)
    assert features.shape == (1, 2048) and np.isfinite(features).all() and not net.training
    assert net.weights == "weights.pth" and "inception-v3-compat" in net.name
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(inception.WeightsHashError, match="weights.pth has SHA-256"):
        inception.Inception()
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", sha256(path))  # the right digest, yet torch cannot read it
    with pytest.raises(WeightsNotFoundError, match="weights.pth is not the FID Inception weights"):
        inception.Inception()


# ---------------------------------------------------------------- the weights' hash, checked before unpickling


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Payload:
    """A pickle that creates `marker` when loaded: what a file planted in a shared torch hub folder could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_pinned_digest_is_the_one_in_the_file_name():
    """torch hub's convention: the name carries the first 8 hex digits of the file's SHA-256."""
    assert len(inception.WEIGHTS_SHA256) == 64 and int(inception.WEIGHTS_SHA256, 16) >= 0
    for name in (*inception.WEIGHTS_NAMES, inception.WEIGHTS_URL):
        assert Path(name).stem.rsplit("-", 1)[-1] == inception.WEIGHTS_SHA256[:8]


@pytest.mark.parametrize("where", ["hub", "env", "argument"])
def test_a_planted_weights_file_is_refused_before_it_is_unpickled(where, hub, tmp_path, monkeypatch):
    checkpoints, timeouts = hub
    marker = tmp_path / "ran"
    path = checkpoints / inception.WEIGHTS_NAMES[0] if where == "hub" else tmp_path / "planted.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(1), "x": Payload(marker)}, path)
    if where == "env":
        monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    with pytest.raises(inception.WeightsHashError) as error:
        inception.Inception(weights=path if where == "argument" else None)
    message = str(error.value)
    assert isinstance(error.value, UsageError) and "\n" not in message
    assert str(path) in message and inception.WEIGHTS_SHA256 in message and sha256(path) in message
    assert "delete it and download" in message and inception.WEIGHTS_URL in message
    assert not marker.exists() and not timeouts  # nothing unpickled, no download tried
    torch.load(path, weights_only=False)["x"].close()  # the payload is live: unpickled as torch-fidelity does, it ran
    assert marker.exists()


def test_a_download_is_hashed_before_it_takes_the_weights_name(hub, monkeypatch):
    checkpoints, _ = hub
    served = [b"<html>rate limited</html>"]

    def respond(url, timeout=None, **kwargs):
        return io.BytesIO(served[0])

    monkeypatch.setattr(urllib.request, "urlopen", respond)
    with pytest.raises(inception.WeightsHashError) as error:
        inception.weights_path()
    message = str(error.value)
    assert f"the download of {inception.WEIGHTS_URL} has SHA-256" in message and "try again" in message
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # neither the file nor a partial one

    served[0] = b"the real weights"
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", hashlib.sha256(served[0]).hexdigest())
    path = inception.weights_path()
    assert path == checkpoints / inception.WEIGHTS_NAMES[0] and path.read_bytes() == served[0]
    assert [p.name for p in checkpoints.iterdir()] == [path.name]
