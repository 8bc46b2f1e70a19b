"""Weights read from files, checked against the network they are for, and named by their digest.

`check_state` says in one line what load_state_dict(strict=True) says in a page (or as a TypeError): which tensor is
missing, unexpected, not a tensor or of another shape. `weights_digest` names a network's weights: a distillation
run's teacher (diffusion.training.consistency), a Gamma cache's key (diffusion.io.gamma_cache).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["WeightsError", "check_state", "weights_digest"]


class WeightsError(UsageError):
    """Weights that do not fit the network their file's config describes."""


def check_state(expected: Mapping[str, Tensor], found: Mapping, what: str, against: str) -> None:
    """WeightsError, in one line, unless `found` holds a tensor of each name and shape in `expected` and no other
    (what load_state_dict(strict=True) would say in a page of text, or as a TypeError for a non-tensor)."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []
        raise WeightsError(f"{what} do not fit {against}: {', '.join(parts)}")
    for name, want in expected.items():
        have = found[name]
        if not isinstance(have, Tensor) or not (have.is_floating_point() or have.dtype == want.dtype):
            kind = f"a {have.dtype} tensor" if isinstance(have, Tensor) else f"a {type(have).__name__}"
            raise WeightsError(f"{what} do not fit {against}: {name} is {kind}, not {want.dtype} weights")
        if have.shape != want.shape:
            raise WeightsError(
                f"{what} do not fit {against}: {name} is {list(have.shape)} there, {list(want.shape)} here"
            )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every entry of a module's state dict, in name order: its name, dtype, shape and bytes. Names a
    network's weights: a teacher (diffusion.training.consistency), a Gamma cache (diffusion.io.gamma_cache)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        flat = value.detach().cpu().contiguous().reshape(-1)
        h.update(hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest().encode())
    return h.hexdigest()
