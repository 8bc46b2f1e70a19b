"""Sample from a trained model: `python sample.py sampler=pndm steps=50` (newest checkpoint), `ckpt=PATH` or
`pretrained=DIR` (a diffusers folder). Several GPUs: `torchrun --nproc_per_node=N sample.py ...`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from diffusion import checkpoints, loggers, timesteps
from diffusion.errors import UsageError
from diffusion.generation import PRECISIONS, Autocast, distributed, generate
from diffusion.images import grid, save_npz, save_png

SEARCH_ROOTS = ("outputs", "multirun")


def sample(cfg: DictConfig) -> np.ndarray | None:
    """Draw cfg.n_samples images; write samples.npz (uint8 NHWC), grid.png, optionally PNGs, FID and a W&B run.
    Returns the images on the main process (None on the others)."""
    with distributed() as dist:
        device = dist.device(cfg.device)
        source, model, schedule, trained = _load(cfg, device)
        if cfg.precision not in PRECISIONS:
            raise UsageError(f"unknown precision={cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if not 1 <= cfg.steps <= schedule.T:
            raise UsageError(f"steps={cfg.steps} is out of range: choose 1 <= steps <= T={schedule.T} (the model's T)")
        ts = timesteps.make(cfg.spacing, cfg.steps, schedule)
        shape = (model.in_channels, model.resolution, model.resolution)
        net = instantiate(cfg.cache)(model, timesteps=ts) if cfg.cache else model
        if PRECISIONS[cfg.precision] is not None:
            net = Autocast(net, PRECISIONS[cfg.precision])
        out = Path(dist.broadcast(str(cfg.out_dir)))
        if dist.is_main:
            print(f"sampling {cfg.n_samples} images from {source} with {_describe(cfg)} on {device} -> {out}")

        start, calls, batches, shards = time.perf_counter(), 0, 0, []
        for images, n_calls in generate(
            net, instantiate(cfg.sampler), schedule, ts, shape, dist.shard(cfg.n_samples), seed=cfg.seed,
            batch_size=cfg.batch_size, device=device, prepare=getattr(net, "reset", None), progress=dist.is_main,
        ):  # fmt: skip
            shards.append(images)
            calls, batches = calls + n_calls, batches + 1
        images = dist.gather(np.concatenate(shards), cfg.n_samples, out)
        seconds = time.perf_counter() - start
        if not dist.is_main:
            return None

    stats = {"nfe": calls / max(batches, 1), "seconds": seconds, "images_per_s": cfg.n_samples / seconds}
    save_npz(images, out / "samples.npz")
    if cfg.grid:
        save_png(grid(images[:256]), out / "grid.png")
    if cfg.png:
        for i, image in enumerate(images):
            save_png(image, out / "images" / f"{i:06d}.png")
    print(f"NFE {stats['nfe']:g} per image, {seconds:.1f} s, {stats['images_per_s']:.2f} images/s; wrote {out}")
    if cfg.fid:
        stats.update(_fid(cfg, out / "samples.npz", trained))
    if cfg.logger:
        _log(cfg, images, stats, source, trained)
    return images


def _load(cfg: DictConfig, device: torch.device):
    """(source, model, schedule, training config) from ckpt=, pretrained= or the newest checkpoint."""
    if cfg.ckpt and cfg.pretrained:
        raise UsageError("pass either ckpt=PATH or pretrained=DIR, not both")
    if cfg.pretrained:
        from diffusion import pretrained

        model, schedule = pretrained.load(cfg.pretrained)
        return cfg.pretrained, model.to(device).eval().requires_grad_(False), schedule.to(device), {}
    path = Path(cfg.ckpt) if cfg.ckpt else _newest_checkpoint()
    checkpoint = checkpoints.load(path)
    model, schedule = checkpoints.load_model(checkpoint, use_ema=cfg.use_ema, device=device)
    return f"{path} ({'EMA' if cfg.use_ema else 'raw'} weights)", model, schedule, checkpoint["config"]


def _describe(cfg: DictConfig) -> str:
    name = cfg.sampler._target_.rsplit(".", 1)[-1]
    cache = f" + DeepCache(interval={cfg.cache.interval})" if cfg.cache else ""
    return f"{name}{cache}, {cfg.steps} {cfg.spacing} steps"


def _fid(cfg: DictConfig, samples: Path, trained: dict) -> dict:
    from diffusion import metrics

    reference = cfg.fid_ref or trained.get("data")
    if not reference:
        raise UsageError("fid=true needs fid_ref=PATH.npz (mu, sigma) or a checkpoint that knows its dataset")
    result = metrics.fid_from_npz(samples, reference, cache_dir=cfg.fid_stats_dir)
    print(result)
    (samples.parent / "fid.json").write_text(json.dumps(result.as_dict(), indent=2))
    return {f"fid/{k}" if k != "fid" else "fid": v for k, v in result.as_dict().items()}


def _log(cfg: DictConfig, images: np.ndarray, stats: dict, source: str, trained: dict) -> None:
    """Record the run with the configured logger: W&B gets a run of job type `sample` in the training project."""
    os.environ.setdefault("WANDB_JOB_TYPE", "sample")
    if trained.get("logger", {}).get("project") and cfg.logger.get("project") == "diffusion":
        cfg.logger.project = trained["logger"]["project"]  # beside the training run it came from
    logger = instantiate(cfg.logger)
    config = {**OmegaConf.to_container(cfg, resolve=True), "source": source, "train_run_id": trained.get("run_id")}
    logger.log_hyperparams(config)
    logger.log_metrics(stats)
    if isinstance(logger, WandbLogger):
        logger.log_image("samples", [grid(images[:64])], caption=[_describe(cfg)])
        logger.experiment.summary.update(stats)
    logger.finalize("success")
    loggers.finish_wandb()


def _newest_checkpoint() -> Path:
    found = [p for p in (checkpoints.newest(r) for r in SEARCH_ROOTS if Path(r).is_dir()) if p is not None]
    if not found:
        raise UsageError(
            f"no checkpoint found under {' or '.join(SEARCH_ROOTS)}/: train one first "
            "(python train.py experiment=quickstart) or pass ckpt=PATH/TO/last.ckpt or pretrained=DIR"
        )
    path = max(found, key=lambda p: p.stat().st_mtime)
    print(f"using the newest checkpoint: {path}")
    return path


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        sample(cfg)
    except (UsageError, InstantiationException, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
