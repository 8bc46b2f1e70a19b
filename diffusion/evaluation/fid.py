"""FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", eq. 6) with the standard FID Inception.

Features are the 2048-d pool3 activations of the TF FID Inception (inception-2015-12-05 weights, the ones
pytorch-fid, torch-fidelity and torchmetrics use) on uint8 RGB images, resized to 299x299 inside the network as
TF did. FIDs from other networks, resizers or sample counts are not comparable, so every result records them.

    python -m diffusion.evaluation.fid samples.npz cifar10      # vs the training set (statistics computed once, cached)
    python -m diffusion.evaluation.fid samples.npz stats.npz    # vs a reference .npz with mu and sigma
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError, reported
from ..frechet import check_gaussian, frechet_distance, stats
from ..images import to_uint8
from ..io import registry
from ..plain import check_file_data
from .inception import Extractor, Inception, WeightsNotFoundError, describe, inception_features, parse_device

# The feature extractor lives in diffusion.evaluation.inception, the Frechet distance in diffusion.frechet; both are
# re-exported because FID callers need them with the rest.
__all__ = ["WeightsNotFoundError", "Inception", "FIDResult", "frechet_distance", "check_gaussian", "stats",
           "save_stats", "load_stats", "inception_features", "reference_stats", "reference_stats_for", "data_config",
           "Reference", "prepare", "fid_of", "read_samples", "fid_from_npz", "main"]  # fmt: skip

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"
Stats = tuple[np.ndarray, np.ndarray, dict]  # mu [D], sigma [D, D], metadata


def save_stats(path: str | os.PathLike, mu, sigma, **meta) -> Path:
    """Write mu [D] and sigma [D, D] (pytorch-fid's .npz keys) plus scalar metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    extra = {k: np.asarray(v) for k, v in meta.items() if v is not None}
    try:
        np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_stats(path: str | os.PathLike) -> Stats:
    """(mu, sigma, metadata) from an .npz with keys mu and sigma (ours, pytorch-fid's or any tool's)."""
    arrays = _read_npz(path, "the reference statistics")
    if "mu" not in arrays or "sigma" not in arrays:
        raise UsageError(
            f"{path} has no mu and sigma (it has {', '.join(arrays) or 'nothing'}): a reference .npz "
            "holds mu [D] and sigma [D, D], as pytorch-fid --save-stats writes"
        )
    meta = {k: v.item() for k, v in arrays.items() if k not in ("mu", "sigma") and v.ndim == 0}
    check_file_data(meta, str(path), "metadata")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise UsageError(f"{path}: mu and sigma are {mu.dtype} and {sigma.dtype}, not numbers")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    try:
        check_gaussian(mu, sigma)
    except ValueError as error:
        raise UsageError(f"{path} holds unusable reference statistics: {error}") from None
    return mu, sigma, meta


def _read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist: check the path")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("it is a single array, not an .npz archive")
        with f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UsageError(f"cannot read {what} {path} as an .npz: {error}") from None


# ---------------------------------------------------------------- reference statistics


def reference_stats(images: np.ndarray | Iterable, cache_path: str | os.PathLike, *, extractor: Extractor | None = None,
                    source: str = "", image_size: int | None = None, **options) -> Stats:  # fmt: skip
    """(mu, sigma, metadata) of reference images: read from `cache_path` if it exists, else computed (`options` go
    to inception_features) and written there atomically with n, source, extractor (a generator is never started
    on a cache hit)."""
    if Path(cache_path).is_file():
        return load_stats(cache_path)
    extractor = extractor if extractor is not None else Inception()
    features = inception_features(images, extractor=extractor, **options)
    name, weights = describe(extractor)
    info = {"n": len(features), "source": source, "extractor": name, "weights": weights, "image_size": image_size}
    save_stats(cache_path, *stats(features), **info)
    return load_stats(cache_path)


# Attributes that change what a DataModule's training set holds (CIFAR-10 and CelebA are the same anywhere).
_CONTENT = {
    "CIFAR10": (),
    "CelebA": (),
    "Synthetic": ("seed", "num_images"),
    "Mixture": ("seed", "num_images", "num_modes", "std", "contrast"),
    "ImageFolder": ("root", "seed", "val_fraction"),
}


def _stats_name(datamodule, extractor: Extractor | None) -> str:
    """e.g. cifar10-32px-inception-2015-12-05: the dataset, its size, a hash of what else defines it, the extractor."""
    cls = type(datamodule).__name__
    keys = _CONTENT.get(cls, ("root", "seed"))
    content = {
        k: str(Path(v).resolve()) if k == "root" else v for k in keys if (v := getattr(datamodule, k, None)) is not None
    }
    name = f"{cls.lower()}-{datamodule.image_size}px" + ("" if datamodule.channels == 3 else f"-c{datamodule.channels}")
    if content:
        name += "-" + hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]
    if extractor is None or isinstance(extractor, Inception):
        return name + "-inception-2015-12-05"
    return name + "-features-" + hashlib.sha1(describe(extractor)[0].encode()).hexdigest()[:8]


def reference_stats_for(datamodule, cache_dir: str | os.PathLike, *, extractor: Extractor | None = None,
                        batch_size: int = 100, num_workers: int | None = None, **options) -> Stats:  # fmt: skip
    """Statistics of a diffusion.data DataModule's training set, un-augmented (build()'s images, never the flipped
    training stream), cached as <cache_dir>/<dataset>-<size>px[-<hash>]-<extractor>.npz; metadata has `path`.
    `num_workers` defaults to the DataModule's; `options` (device, progress) go to inception_features."""
    path = Path(cache_dir) / f"{_stats_name(datamodule, extractor)}.npz"
    if not path.is_file():
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()  # downloads CIFAR-10 where allowed
        train, _ = datamodule.build()
        workers = getattr(datamodule, "num_workers", 0) if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, num_workers=workers)
        source = f"{type(datamodule).__name__} training set, un-augmented"
        reference_stats((to_uint8(x) for x in loader), path, extractor=extractor, source=source,
                        image_size=datamodule.image_size, total=len(loader), **options)  # fmt: skip
    mu, sigma, meta = load_stats(path)
    return mu, sigma, {**meta, "path": str(path)}


def data_config(name: str, **overrides) -> dict:
    """conf/data/<name>.yaml resolved as train.py would with its defaults (data in $DIFFUSION_DATA or data/)."""
    from omegaconf import OmegaConf

    path = CONF_DATA / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONF_DATA.glob("*.yaml")))
        raise UsageError(f"reference {name!r} is neither an .npz with mu and sigma nor a data config ({names})")
    root = {"paths": {"data_dir": os.environ.get("DIFFUSION_DATA", "data")}, "seed": 0}
    cfg = OmegaConf.merge(root, {"data": OmegaConf.load(path)}, {"data": {k: v for k, v in overrides.items() if v}})
    if missing := OmegaConf.missing_keys(cfg):
        raise UsageError(
            f"data config {name} needs {', '.join(sorted(missing))}: e.g. --data-root DIR on the command line"
        )
    return OmegaConf.to_container(cfg, resolve=True)["data"]


def _datamodule(cfg: Mapping):
    """A DataModule from a data config (a checkpoint's, or conf/data's) through the registry: never an import path."""
    return registry.build("data", cfg, where="data")


# ---------------------------------------------------------------- FID of a samples file


@dataclass(frozen=True)
class FIDResult:
    """One FID figure and what it depends on: the sample count, the reference and the feature extractor."""

    fid: float
    n_samples: int
    reference: str
    n_reference: int | None
    extractor: str
    weights: str | None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        ref = self.reference + (f" ({self.n_reference} images)" if self.n_reference else "")
        weights = f" [{self.weights}]" if self.weights else ""
        return f"FID {self.fid:.4g} of {self.n_samples} samples vs {ref}; features: {self.extractor}{weights}"


@dataclass(frozen=True)
class Reference:
    """What FID compares samples with, found and checked (`prepare`): precomputed statistics (`stats`) or a
    DataModule whose training set's statistics are computed once and cached in `cache_dir`."""

    label: str
    image_size: int | None
    stats: Stats | None
    datamodule: object | None
    cache_dir: Path


def prepare(reference, *, cache_dir: str | os.PathLike | None = None, image_size: int | None = None,
            extractor: Extractor | None = None) -> tuple[Reference, Extractor]:  # fmt: skip
    """(the reference, the extractor), with everything that can fail checked, so that sample.py can check it before
    it draws a single image: an .npz is read and its statistics checked (finite, symmetric, as wide as the
    extractor's `features` where it says: 2048 for the FID Inception); a dataset (a name in conf/data, a data config
    mapping or a DataModule) is built, and its files are found unless its statistics are cached; the sizes agree with
    `image_size` (the samples'); the extractor (default the FID Inception: its weights found and hash-checked) is
    loaded."""
    default = Path(os.environ.get("DIFFUSION_DATA", "data")) / "fid_stats"
    cache_dir = Path(cache_dir if cache_dir is not None else default)
    extractor = extractor if extractor is not None else Inception()
    if isinstance(reference, str | os.PathLike) and (str(reference).endswith(".npz") or Path(reference).is_file()):
        loaded, width = load_stats(reference), getattr(extractor, "features", None)
        if width is not None and len(loaded[0]) != width:
            raise UsageError(f"{reference} holds statistics of {len(loaded[0])} features, {describe(extractor)[0]} "
                             f"gives {width}: they come from another network; pass its own reference")  # fmt: skip
        prepared = Reference(str(reference), loaded[2].get("image_size"), loaded, None, cache_dir)
    else:
        reference = data_config(reference) if isinstance(reference, str) else reference
        datamodule = _datamodule(reference) if isinstance(reference, Mapping) else reference
        if not hasattr(datamodule, "build"):
            raise UsageError(f"unknown reference {reference!r}: pass an .npz with mu and sigma, or a data config")
        cached = cache_dir / f"{_stats_name(datamodule, extractor)}.npz"
        stats_ = None
        if cached.is_file():
            stats_ = (*load_stats(cached)[:2], {**load_stats(cached)[2], "path": str(cached)})
        else:  # the dataset's files must be there: a missing CIFAR-10 says so now, not after sampling
            if hasattr(datamodule, "prepare_data"):
                datamodule.prepare_data()
            datamodule.build()
        prepared = Reference(type(datamodule).__name__, datamodule.image_size, stats_, datamodule, cache_dir)
    if image_size is not None and prepared.image_size not in (None, image_size):
        raise UsageError(
            f"the samples are {image_size}px but the reference {prepared.label} is {prepared.image_size}px: compare "
            "samples with their model's training data, at its size (on the command line: --image-size)"
        )
    return prepared, extractor


def fid_of(images: np.ndarray, reference: Reference, extractor: Extractor, **options) -> FIDResult:
    """FID of uint8 images [N, H, W, C] against a prepared reference (computing and caching a dataset's statistics
    on first use). `options` (batch_size, device, progress) go to inception_features."""
    mu_ref, sigma_ref, meta = reference.stats if reference.stats is not None else (None, None, {})
    label = reference.label
    if reference.datamodule is not None:
        if reference.stats is None:
            mu_ref, sigma_ref, meta = reference_stats_for(reference.datamodule, reference.cache_dir,
                                                          extractor=extractor, **options)  # fmt: skip
        label = f"{meta.get('source', label)} ({meta['path']})"
    mu, sigma = stats(inception_features(images, extractor=extractor, **options))
    n_ref = meta.get("n")
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    return FIDResult(fid, len(images), label, None if n_ref is None else int(n_ref), *describe(extractor))


def read_samples(samples_npz: str | os.PathLike) -> np.ndarray:
    """The uint8 images of a samples .npz (`arr_0`, or its only array)."""
    arrays = _read_npz(samples_npz, "the samples")
    images = arrays.get("arr_0", next(iter(arrays.values())) if len(arrays) == 1 else None)
    if images is None:
        raise UsageError(f"{samples_npz} holds {', '.join(arrays) or 'nothing'}: samples go in arr_0 (uint8 NHWC)")
    return images


def fid_from_npz(samples_npz: str | os.PathLike, reference, *, cache_dir: str | os.PathLike | None = None,
                 extractor: Extractor | None = None, **options) -> FIDResult:  # fmt: skip
    """FID of uint8 samples (`arr_0` [N, H, W, C] of an .npz, as sample.py writes) against `reference`: an .npz with
    mu and sigma, a data config (a name in conf/data, or a mapping with _target_) or a DataModule, whose training
    set's statistics are computed once and cached in `cache_dir` (default $DIFFUSION_DATA/fid_stats). `options`
    (batch_size, device, progress) go to inception_features."""
    images = read_samples(samples_npz)
    parse_device(options.get("device", "auto"))  # a typo fails now, not after the weights are loaded
    size = images.shape[1] if images.ndim == 4 else None
    prepared, extractor = prepare(reference, cache_dir=cache_dir, image_size=size, extractor=extractor)
    return fid_of(images, prepared, extractor, **options)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.evaluation.fid", description=__doc__.split("\n")[0])
    parser.add_argument("samples", help="samples .npz (uint8 NHWC arr_0), e.g. outputs/samples/.../samples.npz")
    parser.add_argument("reference", help="an .npz with mu and sigma, or a data config name: cifar10, celeba, ...")
    parser.add_argument("--data-root", help="the data config's root (e.g. for folder); default from the config")
    parser.add_argument("--image-size", type=int, help="the data config's image_size; default from the config")
    parser.add_argument("--cache-dir", help="where reference statistics are cached (default $DIFFUSION_DATA/fid_stats)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    with reported(ValueError):  # the statistics, devices and batch sizes it is given are checked with ValueError
        reference = args.reference
        if not reference.endswith(".npz") and not Path(reference).is_file():
            reference = data_config(reference, root=args.data_root, image_size=args.image_size)
        result = fid_from_npz(
            args.samples, reference, cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device
        )
    print(json.dumps(result.as_dict()) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
