"""LPIPS (Zhang et al. 2018, v0.1 "vgg"), the distance consistency distillation used on images (Song et al. 2023):
unit-normalised VGG16 features at five depths, squared differences weighted per channel by learned linear layers,
averaged over space and summed over depths. Inputs in [-1, 1] are resized to 224 (bilinear) first, as the consistency
models code does for images smaller than 256.

Two weight files, which this project never downloads: torchvision's ImageNet VGG16 (`vgg16-397923af.pth`, checked by
the 8 SHA-256 digits in its name, torch hub's convention) and the lpips package's calibration `weights/v0.1/vgg.pth`.
Both are read with torch.load(weights_only=True): tensors only, never code. Looked up at $DIFFUSION_LPIPS_VGG, else
torch hub's checkpoints folder; and $DIFFUSION_LPIPS_LIN, else the installed `lpips` package (`pip install lpips`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

from ..errors import UsageError

__all__ = ["LPIPS", "vgg_path", "lin_path"]

VGG_NAME, VGG_SHA256_PREFIX = "vgg16-397923af.pth", "397923af"
VGG_FETCH = "python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\""
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
CHANNELS = (64, 128, 256, 512, 512)
SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # lpips v0.1's input scaling layer


def vgg_path() -> Path:
    """torchvision's ImageNet VGG16 weights: $DIFFUSION_LPIPS_VGG, else torch hub's checkpoints folder."""
    default = Path(torch.hub.get_dir()) / "checkpoints" / VGG_NAME
    path = Path(os.environ.get("DIFFUSION_LPIPS_VGG") or default).expanduser()
    if not path.is_file():
        raise UsageError(
            f"loss=lpips needs torchvision's ImageNet VGG16 weights, and {path} is not a file. On a machine with "
            f"internet run {VGG_FETCH} (it saves {default}; TORCH_HOME moves it), copy that file here, or set "
            "DIFFUSION_LPIPS_VGG=PATH"
        )
    return path


def lin_path() -> Path:
    """LPIPS v0.1's calibration weights: $DIFFUSION_LPIPS_LIN, else the installed lpips package's file (found without
    importing the package)."""
    if os.environ.get("DIFFUSION_LPIPS_LIN"):
        path = Path(os.environ["DIFFUSION_LPIPS_LIN"]).expanduser()
    else:
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(
                "loss=lpips needs LPIPS v0.1's calibration weights (weights/v0.1/vgg.pth, 7 kB): `pip install lpips` "
                "ships them, or set DIFFUSION_LPIPS_LIN=PATH to a copy"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise UsageError(f"LPIPS calibration weights: {path} is not a file; set DIFFUSION_LPIPS_LIN=PATH to vgg.pth")
    return path


def _tensors(path: Path, what: str) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: a file is never code
    except Exception as error:
        raise UsageError(f"{path} is not a readable {what} weight file ({error}); download it again") from error
    if not isinstance(state, dict):
        raise UsageError(f"{path} is not a state dict of {what} weights")
    return state


class LPIPS(nn.Module):
    """The LPIPS distance, frozen: forward(a, b) -> [B], differentiable in its inputs (CD's student output).

    Args:
        size: inputs smaller than this are resized to it (bilinear) first, as the consistency models code does; None
            keeps them as they are.
    """

    def __init__(self, size: int | None = 224) -> None:
        super().__init__()
        self.size = size
        self.features = make_layers(cfgs["D"])[: TAPS[-1] + 1]  # VGG16's convolutions (its classifier: 120M unused)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg: str | os.PathLike | None = None, lin: str | os.PathLike | None = None, **kwargs) -> LPIPS:
        """Load the two weight files (default: `vgg_path()`, `lin_path()`), checking names, shapes and VGG's digits."""
        vgg, lin = Path(vgg) if vgg else vgg_path(), Path(lin) if lin else lin_path()
        digest = hashlib.sha256()
        with open(vgg, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(VGG_SHA256_PREFIX):
            raise UsageError(
                f"{vgg} has SHA-256 {digest.hexdigest()[:16]}..., but torchvision's ImageNet VGG16 ({VGG_NAME}) starts "
                f"with {VGG_SHA256_PREFIX}: not that file (truncated, or another network). Fetch it with {VGG_FETCH}"
            )
        model = cls(**kwargs)
        features = {k.removeprefix("features."): v for k, v in _tensors(vgg, "VGG16").items()}
        weights = {k: v for k, v in features.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= TAPS[-1]}
        calibration = {k.replace("lin", "", 1).replace(".model.1", ""): v for k, v in _tensors(lin, "LPIPS").items()}
        for part, state, what in ((model.features, weights, vgg), (model.lins, calibration, lin)):
            try:
                part.load_state_dict(state)
            except RuntimeError as error:
                raise UsageError(f"{what} does not hold the expected LPIPS weights: {error}") from error
        return model

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        x = torch.cat([a, b]).float()
        if self.size and x.shape[-1] < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h, total = (x - self.shift) / self.scale, 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                u = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
                ua, ub = u.chunk(2)
                total = total + self.lins[TAPS.index(i)]((ua - ub).pow(2)).mean((1, 2, 3))
        return total
