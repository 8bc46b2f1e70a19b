"""Image output: [-1, 1] float tensors to uint8, grids, PNGs and the .npz that FID tools read."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["to_uint8", "grid", "class_grid", "save_png", "save_npz"]


def to_uint8(x: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (NHWC, the layout of FID reference batches)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 [B, H, W, C] images into one [rows*H, cols*W, C] image with `pad` pixels between them."""
    b, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return out


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 16, pad: int = 2) -> np.ndarray:
    """One row per class present in `labels` [B] (in label order), its first `per_class` images (fewer where every
    class has fewer), as `grid` tiles them."""
    classes = np.unique(labels)
    cols = min(per_class, min(int((labels == k).sum()) for k in classes))
    rows = [images[labels == k][:cols] for k in classes]
    return grid(np.concatenate(rows), ncols=cols, pad=pad)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one uint8 [H, W, C] image (C = 1 or 3) as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def save_npz(images: np.ndarray, path: str | os.PathLike, *, replace: bool = True,
             labels: np.ndarray | None = None) -> Path:  # fmt: skip
    """Write uint8 [N, H, W, C] images as `arr_0` of an .npz (the format of FID tools), and their class labels [N]
    as `arr_1` (guided-diffusion's layout) if given, atomically.

    The temporary file is unique to this call (pid and a random token), so runs writing into one folder never
    share it, and it is removed if writing fails. `replace=False` never replaces an existing file: another run
    that wrote `path` meanwhile makes this one fail (FileExistsError) instead of losing its samples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez(f, images) if labels is None else np.savez(f, images, labels)
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _place_new(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path` unless `path` exists: atomically with a hard link where the file system has them."""
    try:
        os.link(tmp, path)  # `tmp` stays, and is removed by the caller
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: a check, then a rename
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
