"""Analytic-DPM's Gamma and the data's variance, computed once per model and cached beside its weights; the training
images they need.

The cache is data, never code (DESIGN principle 7): an .npz of three plain arrays (gamma, data_var, key) read with
allow_pickle=False, its key, shape, dtype and values checked, refused (and rebuilt) when any check fails. Written
atomically. FORMAT is part of the key and of the file name: a file of an older format is never read as this one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError
from ..sampling.analytic import check_gamma, data_variance, estimate_gamma
from ..sampling.core import Model
from ..schedule import Schedule
from ..weights import weights_digest
from . import registry

__all__ = ["cached_gamma", "training_images", "takes_gamma", "for_sampling", "GAMMA_SEED"]

GAMMA_SEED = 0  # which training images and noises Gamma uses: fixed, so that sampling seeds share one cache
FORMAT = 2  # 1: gamma and key only; 2: with data_var (Theorem 2's bound for unbounded data)


def cached_gamma(model: Model, schedule: Schedule, images: Callable[[], Tensor], *, path_stem: Path, M: int,
                 seed: int, data: str, batch_size: int = 256, device: torch.device | str = "cpu",
                 progress: bool = True) -> tuple[Tensor, float]:  # fmt: skip
    """(Gamma [T] float64, data_var) of `model` (an nn.Module) from `images()` (M training images, loaded only on a
    miss; data_var = `data_variance` of the same images), cached in `<path_stem>.gamma.M<M>.<key>.npz`. The key
    hashes the weights' bytes, the schedule, `data` (a description of the images), M, seed and FORMAT, and is stored
    and checked inside the file, so an overwritten last.ckpt, the other weights (EMA or raw), another M or an older
    format never reuse it. A file that fails the checks is refused, said so, and rebuilt.
    """
    key = json.dumps({"weights": weights_digest(model), "schedule": _hash(schedule.alphas_cumprod),
                      "data": data, "M": M, "seed": seed, "format": FORMAT}, sort_keys=True)  # fmt: skip
    path = Path(f"{path_stem}.gamma.M{M}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    if path.exists():
        try:
            return _read(path, key, schedule.T)
        except ValueError as error:
            print(f"refusing the cached Gamma {path} ({error}); computing it again")
    print(f"computing Gamma (Analytic-DPM) once for this model: {schedule.T} timesteps x M={M} images -> {path}")
    x0 = images().to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    gamma = estimate_gamma(model, x0, schedule, batch_size=batch_size, generator=g, progress=progress)
    data_var = data_variance(x0)
    try:
        _write(path, gamma, data_var, key)
    except OSError as error:  # a read-only model folder: sample anyway, but say that the work is not kept
        print(f"could not cache Gamma at {path} ({error}); it will be computed again next time")
    return gamma, data_var


def _read(path: Path, key: str, T: int) -> tuple[Tensor, float]:
    """(Gamma, data_var) from a cache file: plain arrays only (no pickle), the right key, shape, dtype and values."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except Exception as error:  # truncated, not a zip, or a pickled object array
        raise ValueError(f"unreadable: {type(error).__name__}: {error}") from None
    if set(arrays) != {"gamma", "data_var", "key"}:
        raise ValueError(f"holds {sorted(arrays)}, not gamma, data_var and key (format {FORMAT})")
    if arrays["key"].dtype.kind != "U" or arrays["key"].shape != () or str(arrays["key"]) != key:
        raise ValueError("its key does not match these weights, schedule, data, M and seed")
    gamma, data_var = arrays["gamma"], arrays["data_var"]
    if gamma.dtype != np.float64 or data_var.dtype != np.float64 or data_var.shape != ():
        raise ValueError(f"gamma is {gamma.dtype}, data_var {data_var.dtype} {data_var.shape}, not float64 [T], []")
    if not float(data_var) > 0:  # inf is M = 1's honest answer (no bound); NaN, 0 and below are damage
        raise ValueError(f"data_var is {float(data_var)}, not > 0")
    return check_gamma(torch.from_numpy(gamma.copy()), T, where=f"gamma in {path}"), float(data_var)


def _write(path: Path, gamma: Tensor, data_var: float, key: str) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, gamma=gamma.numpy().astype(np.float64), data_var=np.float64(data_var), key=np.array(key))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _hash(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def training_images(data: Mapping, M: int, seed: int, where: str = "data") -> Tensor:
    """M training images [M, C, H, W] drawn without replacement (fixed by `seed`) from the dataset a data config
    describes, built through diffusion.io.registry (a config read from a checkpoint names only our own classes)."""
    module = registry.build("data", data, where=where)
    module.prepare_data()  # CIFAR-10's download, or its one-line DataNotFoundError
    module.setup()
    train = module.train_set
    if M > len(train):
        raise UsageError(
            f"gamma_M={M} exceeds the {len(train)} training images of {where}: use gamma_M <= {len(train)}"
        )
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:M]
    return torch.stack([torch.as_tensor(train[i]) for i in index.tolist()])


# -------------------------------------------------------------------- sample.py's side
def takes_gamma(sampler) -> bool:
    """True for a sampler (or a functools.partial of one) that needs the model's Gamma: the Analytic-DPM ones."""
    return "gamma" in inspect.signature(getattr(sampler, "func", sampler)).parameters


def for_sampling(model: torch.nn.Module, schedule: Schedule, *, weights: Path, label: str, data: Mapping | None,
                 M: int, batch_size: int, device: torch.device, source: str) -> tuple[Tensor, float]:  # fmt: skip
    """(Gamma, data_var) for sample.py: from M images of `data` (the data=... option, else the checkpoint's own
    training config), cached beside `weights` (a checkpoint file, or a diffusers folder) under `label` (ema, raw)."""
    if not data:
        raise UsageError(f"Analytic-DPM estimates Gamma from training images, and {source} does not name its "
                         "dataset: pass data=NAME (a conf/data file, e.g. data=cifar10 for google/ddpm-cifar10-32; "
                         "data.root=DIR if the files are elsewhere)")  # fmt: skip
    data = dict(data)
    stem = weights.parent / f"{weights.stem}.{label}" if weights.is_file() else weights / f"analytic.{label}"
    described = json.dumps({k: v for k, v in data.items() if k not in ("batch_size", "num_workers")}, sort_keys=True)
    return cached_gamma(model, schedule, lambda: training_images(data, M, GAMMA_SEED), path_stem=stem, M=M,
                        seed=GAMMA_SEED, data=described, batch_size=batch_size, device=device)  # fmt: skip
