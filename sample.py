"""Sample from a trained model: `python sample.py sampler=ddim steps=50` (newest checkpoint) or `ckpt=PATH`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from diffusion import checkpoints, timesteps
from diffusion.errors import UsageError
from diffusion.generation import CountCalls, image_noise
from diffusion.images import grid, save_npz, save_png, to_uint8

SEARCH_ROOTS = ("outputs", "multirun")


def sample(cfg: DictConfig) -> np.ndarray:
    """Draw cfg.n_samples images with the configured sampler; write samples.npz (uint8 NHWC) and grid.png."""
    path = Path(cfg.ckpt) if cfg.ckpt else _newest_checkpoint()
    device = torch.device(_auto_device() if cfg.device == "auto" else cfg.device)
    model, schedule = checkpoints.load_model(checkpoints.load(path), use_ema=cfg.use_ema, device=device)
    shape = (model.in_channels, model.resolution, model.resolution)
    if cfg.spacing not in timesteps.SPACINGS:
        raise UsageError(f"unknown spacing={cfg.spacing!r}: choose one of {', '.join(timesteps.SPACINGS)}")
    if not 1 <= cfg.steps <= schedule.T:
        raise UsageError(f"steps={cfg.steps} is out of range: the model was trained with T={schedule.T} steps")
    ts = timesteps.SPACINGS[cfg.spacing](cfg.steps, schedule.T)
    sampler, counted = instantiate(cfg.sampler), CountCalls(model)
    print(
        f"sampling {cfg.n_samples} images from {path} ({'EMA' if cfg.use_ema else 'raw'} weights), "
        f"{cfg.sampler._target_.rsplit('.', 1)[-1]} with {cfg.steps} {cfg.spacing} steps on {device}"
    )

    images, start = [], time.perf_counter()
    for first in tqdm(range(0, cfg.n_samples, cfg.batch_size), desc="batches", unit="batch"):
        indices = range(first, min(first + cfg.batch_size, cfg.n_samples))
        noise = image_noise(cfg.seed, indices, shape).to(device)
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + first)  # stochastic samplers' noise
        images.append(to_uint8(sampler(counted, noise, schedule, ts, generator=g)))
    seconds, images = time.perf_counter() - start, np.concatenate(images)

    out = Path(cfg.out_dir)
    save_npz(images, out / "samples.npz")
    if cfg.grid:
        save_png(grid(images[:256]), out / "grid.png")
    nfe = counted.calls / -(-cfg.n_samples // cfg.batch_size)
    print(f"NFE {nfe:g} per image, {seconds:.1f} s, {cfg.n_samples / seconds:.2f} images/s; wrote {out}")
    return images


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _newest_checkpoint() -> Path:
    found = [p for p in (checkpoints.newest(r) for r in SEARCH_ROOTS if Path(r).is_dir()) if p is not None]
    if not found:
        raise UsageError(
            f"no checkpoint found under {' or '.join(SEARCH_ROOTS)}/: train one first "
            "(python train.py experiment=quickstart) or pass ckpt=PATH/TO/last.ckpt"
        )
    path = max(found, key=lambda p: p.stat().st_mtime)
    print(f"using the newest checkpoint: {path}")
    return path


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        sample(cfg)
    except (UsageError, InstantiationException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
