"""The standard FID feature extractor: the TF FID Inception (inception-2015-12-05 weights, as pytorch-fid,
torch-fidelity and torchmetrics use them), through torch-fidelity's port, and where its weights file lives.

Offline, the weights are looked up in $DIFFUSION_FID_WEIGHTS, then torch hub's checkpoints folder; a missing file
stops with a message that says which file to put where. torch-fidelity unpickles that file (weights_only=False), so
its SHA-256 is checked first, wherever it came from: a file planted in a shared cache never gets to run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import UsageError

__all__ = ["WeightsNotFoundError", "WeightsHashError", "Inception", "Extractor", "weights_path", "check_weights",
           "inception_features", "describe", "parse_device"]  # fmt: skip

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
# torch-fidelity's file name, then pytorch-fid's for the same weights.
WEIGHTS_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
# The released file's full SHA-256 (95,628,359 bytes). torch-fidelity and pytorch-fid publish only its first 8 hex
# digits, in the file name (torch hub's convention); this full digest is the one several independent projects record
# for that file, and it starts with those digits. pytorch-fid's copy carries the same 8 digits, so it is taken to be
# the same file (were it not, it would be refused like any other).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "DIFFUSION_FID_WEIGHTS"
Extractor = Callable[[Tensor], Tensor]  # uint8 [B, 3, H, W] -> features [B, D]


class WeightsNotFoundError(UsageError):
    """The FID Inception weights are neither on disk nor downloadable."""


class WeightsHashError(WeightsNotFoundError):
    """A file in the weights' place that is not them (truncated, or planted): it is never unpickled."""


def check_weights(path: str | os.PathLike, download: str | None = None) -> Path:
    """`path` if its SHA-256 is WEIGHTS_SHA256, else WeightsHashError naming both digests and what to do (`download`:
    the URL the file just came from, for the message)."""
    path, digest = Path(path), hashlib.sha256()
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} is not a file: download {WEIGHTS_URL} to that path")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WEIGHTS_SHA256:
        what, fix = (
            (f"the download of {download}", "try again, or download it elsewhere")
            if download
            else (str(path), f"delete it and download {WEIGHTS_URL} again")
        )
        raise WeightsHashError(
            f"{what} has SHA-256 {digest.hexdigest()}, but the FID Inception weights have {WEIGHTS_SHA256}: it is "
            f"not that file (a truncated download, or one planted in a shared folder), so it is not loaded. {fix}, "
            f"or set {WEIGHTS_ENV} to a good copy"
        )
    return path


def weights_path(download: bool = True, timeout: float = 20.0) -> Path:
    """The FID Inception weights: $DIFFUSION_FID_WEIGHTS, else torch hub's checkpoints folder (torch-fidelity's or
    pytorch-fid's file name), else downloaded there (one try, at most `timeout` seconds without data)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / WEIGHTS_NAMES[0]
    where = f"put it at {target} (torch hub's checkpoints folder, moved by TORCH_HOME) or set {WEIGHTS_ENV}=PATH"
    if os.environ.get(WEIGHTS_ENV):
        path = Path(os.environ[WEIGHTS_ENV]).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{WEIGHTS_ENV}={path} is not a file: download {WEIGHTS_URL} to that path")
        return path
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return folder / name
    why = "not downloaded"
    if download:
        try:
            return _download(WEIGHTS_URL, target, timeout)
        except OSError as error:  # URLError, timeouts, refused connections, disk errors
            why = f"the download failed: {getattr(error, 'reason', None) or error}"
    raise WeightsNotFoundError(
        f"the FID Inception weights are missing ({why}). On a machine with internet, download {WEIGHTS_URL} and "
        f"{where}. pytorch-fid's copy of the same weights, {WEIGHTS_NAMES[1]}, works too."
    )


def _download(url: str, path: Path, timeout: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    print(f"downloading the FID Inception weights {url} -> {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        check_weights(tmp, download=url)  # before the file takes the trusted name
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Inception(torch.nn.Module):
    """The FID Inception (torch-fidelity's port of TF's inception-2015-12-05, with TF's bilinear resize to 299):
    uint8 [B, 3, H, W] -> pool3 features [B, 2048]. Frozen, in eval mode."""

    features = 2048  # the width of what it returns: reference statistics of another width come from another network

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        try:
            import torch_fidelity
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UsageError("FID needs torch-fidelity: pip install torch-fidelity") from None
        path = check_weights(weights if weights else weights_path())  # torch-fidelity unpickles it: hash first
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
            first = str(error).strip().split("\n")[0][:200]
            raise WeightsNotFoundError(
                f"{path} is not the FID Inception weights ({type(error).__name__}: {first}): "
                f"replace it with {WEIGHTS_URL}"
            ) from None
        self.name = f"torch-fidelity {torch_fidelity.__version__} inception-v3-compat pool3 (2048-d)"
        self.weights = path.name

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[0]


def describe(extractor: Extractor) -> tuple[str, str | None]:
    """(name, weights file) of a feature extractor, for the record."""
    name = getattr(extractor, "name", None) or getattr(extractor, "__qualname__", None) or type(extractor).__qualname__
    return str(name), getattr(extractor, "weights", None)


def parse_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None


def inception_features(images: np.ndarray | Iterable, batch_size: int = 100, device: str | torch.device = "auto",
                       extractor: Extractor | None = None, *, total: int | None = None,
                       progress: bool = True) -> np.ndarray:  # fmt: skip
    """Features [N, D] of uint8 images [N, H, W, C], C = 1 or 3 (an array, or an iterable of such batches), under
    `extractor` (uint8 [B, 3, H, W] -> [B, D]; default the FID Inception, D = 2048), in eval mode, no grad."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = parse_device(device)
    extractor = extractor if extractor is not None else Inception()
    if isinstance(extractor, torch.nn.Module):
        extractor.to(device).eval()
    if isinstance(images, np.ndarray | Tensor):
        array, total = images, -(-len(images) // batch_size)
        images = (array[i : i + batch_size] for i in range(0, len(array), batch_size))
    out = []
    with torch.inference_mode():
        for batch in tqdm(images, total=total, desc="FID features", unit="batch", disable=not progress, leave=False):
            x = torch.as_tensor(batch)
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise ValueError(
                    f"images must be uint8 [N, H, W, C] with C = 1 or 3 (as samples.npz stores them), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            x = x.to(device).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)  # grey -> RGB, as FID tools do
            features = extractor(x)
            if features.ndim != 2 or len(features) != len(x):
                raise ValueError(f"the extractor must return [B, D] features, got {tuple(features.shape)}")
            out.append(features.float().cpu().numpy())
    if not out:
        raise ValueError("no images to compute features of")
    return np.concatenate(out)
