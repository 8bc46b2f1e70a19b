"""The pieces of a sample.py run, in the order it takes them: load the model, plan and check the sampling, prepare
what comes after it (FID's reference, the logger), draw the images, write and record them."""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from .. import timesteps
from ..errors import UsageError
from ..evaluation import fid, shapes
from ..images import class_grid, grid, save_npz, save_png
from ..io import checkpoints, gamma_cache, pretrained
from ..sampling.consistency import ConsistencyModel, consistency_sampling
from ..sampling.generate import PRECISIONS, Autocast, generate
from ..wrappers import prediction
from ..wrappers.guidance import Guided, num_classes_of
from . import conditioning, loggers

__all__ = ["load", "plan", "prepare", "with_gamma", "wrap", "draw", "write", "describe", "adaptive",
           "newest_checkpoint"]  # fmt: skip

SEARCH_ROOTS = ("outputs", "multirun")


def prepare(dist, cfg: DictConfig, trained: dict, shape: tuple[int, int, int]) -> dict:
    """What the main process needs once the images are drawn, prepared (and so checked) before they are: the FID
    reference and extractor, the logger. Their errors reach every process (dist.on_main)."""
    after: dict = {}
    if cfg.fid:
        reference = cfg.fid_ref or trained.get("data")
        dist.on_main(lambda: after.update(fid=fid.prepare(reference, cache_dir=cfg.fid_stats_dir,
                                                         image_size=shape[1])))  # fmt: skip
    if cfg.logger:
        dist.on_main(lambda: after.update(logger=logger(cfg, trained)))
    return after


def with_gamma(dist, cfg: DictConfig, sampler, model, schedule, trained: dict, weights: Path, source: str, device):
    """(sampler, Gamma): Analytic-DPM's samplers with the model's Gamma (computed once on the main process, cached
    beside the weights) and the data's variance bound in; the others as they are, Gamma None."""
    if not gamma_cache.takes_gamma(sampler):
        return sampler, None
    g, data_var = dist.on_main(gamma, cfg, model, schedule, trained, weights, source, device)
    return functools.partial(sampler, gamma=g, data_var=data_var), g  # data_var: Theorem 2's bound


def draw(dist, net, sampler, schedule, ts, shape, cfg: DictConfig, device, labels=None) -> tuple[np.ndarray | None,
                                                                                                 dict]:  # fmt: skip
    """(the images on the main process, None elsewhere; NFE and timing): this process's share, checked for NaN on
    every process before anything is written, gathered in index order. `labels` [n_samples]: image i's class."""
    start, calls, batches, nonfinite, shards = time.perf_counter(), 0, 0, 0, []
    for images, n_calls, n_bad in generate(
        net, sampler, schedule, ts, shape, dist.shard(cfg.n_samples), seed=cfg.seed,
        batch_size=cfg.batch_size, device=device, prepare=getattr(net, "reset", None), progress=dist.is_main,
        condition=conditioning.condition(net, labels),
    ):  # fmt: skip
        shards.append(images)
        calls, batches, nonfinite = calls + n_calls, batches + 1, nonfinite + n_bad
    if nonfinite := dist.total(nonfinite):  # every rank stops here, before the gather writes anything
        raise UsageError(nonfinite_message(cfg, nonfinite))
    images = dist.gather(np.concatenate(shards), cfg.n_samples, Path(cfg.out_dir))
    seconds = time.perf_counter() - start
    return images, {"nfe": calls / max(batches, 1), "seconds": seconds, "images_per_s": cfg.n_samples / seconds}


def write(images: np.ndarray, out: Path, cfg: DictConfig, stats: dict, after: dict, source: str, trained: dict,
          spacing: str, labels: np.ndarray | None = None) -> None:  # fmt: skip
    """samples.npz first (the labels as arr_1), then what may still fail (grid, PNGs, FID, the logger): an error
    there says where the samples are. With several classes the grid has a row per class."""
    try:
        save_npz(images, out / "samples.npz", replace=False, labels=labels)
    except FileExistsError:
        raise UsageError(f"another run wrote {out / 'samples.npz'} meanwhile: pass a new out_dir=PATH") from None
    print(f"NFE {stats['nfe']:g} per image, {stats['seconds']:.1f} s, {stats['images_per_s']:.2f} images/s; "
          f"wrote {out}")  # fmt: skip
    if (trained.get("data") or {}).get("_target_") == "diffusion.synthetic.Synthetic" and images.shape[-1] == 3:
        stats["shape_score"] = shapes.shape_score(images)  # the quickstart's number (diffusion/evaluation/shapes.py)
        print(f"shape score {100 * stats['shape_score']:.1f}%: the share of samples that are one solid shape of a "
              "data colour on a flat background of a data level (the data: 100%)")  # fmt: skip
    try:
        if cfg.grid:
            several = labels is not None and len(np.unique(labels)) > 1
            save_png(class_grid(images, labels) if several else grid(images[:256]), out / "grid.png")
        if cfg.png:
            for i, image in enumerate(images):
                save_png(image, out / "images" / f"{i:06d}.png")
        if cfg.fid:
            stats.update(record_fid(images, out, *after["fid"]))
        if cfg.logger:
            log(after["logger"], cfg, images, stats, source, trained, spacing, labels)
    except (UsageError, OSError) as error:  # the samples are safe: say where, and what is left to do
        raise UsageError(f"{error} (the {len(images)} samples are saved in {out / 'samples.npz'}; "
                         f"python -m diffusion.evaluation.fid scores them)") from error  # fmt: skip


def plan(cfg: DictConfig, model, schedule, source: str, device, guide=None) -> tuple:
    """(sampler, spacing, image shape [C, H, W]) after the checks that need the model: steps <= T, the sampler
    fits the model, the sampler's own option checks on one zero pixel along the very timesteps it will take, and
    the wrappers' (Skip-Tuning, DeepCache) on this UNet."""
    if not cfg.steps <= schedule.T:
        raise UsageError(f"steps={cfg.steps} is out of range: choose 1 <= steps <= T={schedule.T} (the model's T)")
    sampler = instantiate(cfg.sampler)
    if getattr(sampler, "func", None) is consistency_sampling and not isinstance(model, ConsistencyModel):
        raise UsageError(f"sampler=consistency samples consistency models (train.py experiment=cd, ct or pcm), and "
                         f"{source} is a diffusion model: use sampler=ddim, dpm_solver, unipc, ...")  # fmt: skip
    # the sampler's own spacing, its paper's; from T-1 (trailing, Lin et al. 2024) where T-1 is pure noise
    spacing = cfg.spacing or ("trailing" if schedule.zero_terminal else timesteps.paper_spacing(sampler)[0])
    try:  # with a zero Gamma for Analytic-DPM, whose optimal trajectory needs the real one
        check = sampler
        if gamma_cache.takes_gamma(sampler):
            check = functools.partial(sampler, gamma=torch.zeros(schedule.T, dtype=torch.float64), data_var=1.0)
        ts = timesteps.make("even" if spacing in timesteps.GAMMA_SPACINGS else spacing, cfg.steps, schedule)
        with warnings.catch_warnings():  # make's StartWarning said it
            warnings.simplefilter("ignore", timesteps.StartWarning)
            check(lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, 1, 1, device=device), schedule, ts)
    except ValueError as error:
        raise UsageError(f"sampler options: {error}") from error
    wrap(cfg, model, ts, guide, schedule)  # Skip-Tuning's, DeepCache's, guidance's checks, before anything is written
    return sampler, spacing, (model.in_channels, model.resolution, model.resolution)


def wrap(cfg: DictConfig, model, ts, guide=None, schedule=None):
    """The network the sampler calls: Skip-Tuning and DeepCache around the UNet (their own checks as UsageErrors,
    naming the group), under autocast for bf16 / fp16, then labels and guidance (the guide network plain, under the
    same autocast), and outermost what the network predicts (x0 or v as eps, whose arithmetic stays fp32)."""
    if isinstance(model, ConsistencyModel) and num_classes_of(model) is not None:  # the labels go inside f
        labelled = prediction.around(model.net, Guided(prediction.inner(model.net), num_classes_of(model)))
        model = ConsistencyModel(labelled, model.schedule, model.phases).to(model.edges.device)
    group, net = "skip", prediction.inner(model)
    try:
        net = instantiate(cfg.skip)(net) if cfg.skip else net
        group = "cache"
        if cfg.cache:  # count null: every N-th call for sampler=pf, whose calls are the solver's, else steps
            count = cfg.cache.get("count") or ("calls" if adaptive(cfg) else "steps")
            if count == "steps" and adaptive(cfg):
                raise ValueError("count=steps picks full steps among the timesteps, and sampler=pf evaluates where its "
                                 "solver chooses: use cache.count=calls (every N-th call) or null")  # fmt: skip
            net = instantiate(cfg.cache, count=count)(net, timesteps=ts)
    except ValueError as error:
        raise UsageError(f"{group} options: {error}") from error
    dtype = PRECISIONS[cfg.precision]
    net, guide = (net, guide) if dtype is None else (Autocast(net, dtype), guide and Autocast(guide, dtype))
    net = conditioning.guided(cfg, net, num_classes_of(prediction.inner(model)), schedule, guide)
    return prediction.around(model, net)


def load(cfg: DictConfig, device: torch.device):
    """(source, model, schedule, training config, weights path) from ckpt=, pretrained= or the newest checkpoint."""
    if cfg.pretrained:
        model, schedule = pretrained.load(cfg.pretrained)
        model = model.to(device).eval().requires_grad_(False)
        return cfg.pretrained, model, schedule.to(device), {}, Path(cfg.pretrained)
    path = Path(cfg.ckpt) if cfg.ckpt else newest_checkpoint()
    checkpoint = checkpoints.load(path)
    model, schedule = checkpoints.load_model(checkpoint, use_ema=cfg.use_ema, device=device)
    return f"{path} ({'EMA' if cfg.use_ema else 'raw'} weights)", model, schedule, checkpoint["config"], path


def gamma(cfg: DictConfig, model, schedule, trained: dict, weights: Path, source: str, device) -> tuple:
    """Analytic-DPM's (Gamma, data_var) from cfg.gamma_M images of data=NAME, else of the checkpoint's training data."""
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else trained.get("data")
    label = "ema" if cfg.use_ema else "raw"
    return gamma_cache.for_sampling(model, schedule, weights=weights, label=label, data=data, M=cfg.gamma_M,
                                       batch_size=cfg.gamma_batch_size, device=device, source=source)  # fmt: skip


def nonfinite_message(cfg: DictConfig, n: int) -> str:
    fixes = [] if cfg.pretrained else [f"use_ema={str(not cfg.use_ema).lower()}", "an earlier step_XXXXXXX.ckpt"]
    fixes += ["precision=fp32"] if cfg.precision != "fp32" else []
    return (f"{n} of {cfg.n_samples} images are NaN or infinite, so nothing was written: the weights have probably "
            f"diverged. Try {' or '.join(fixes) or 'other weights'}")  # fmt: skip


def sampler_name(cfg: DictConfig) -> str:
    """The sampler function's name, e.g. "dpm_solver" for diffusion.sampling.dpm_solver."""
    return cfg.sampler._target_.rsplit(".", 1)[-1]


def adaptive(cfg: DictConfig) -> bool:
    """Whether the sampler chooses its own steps (sampler=pf): `steps` and the spacing then only set its start."""
    return sampler_name(cfg) == "pf"


def describe(cfg: DictConfig, spacing: str) -> str:
    """e.g. "dpm_solver, 20 logsnr steps (the sampler's own: the DPM-Solver code's logSNR grid; spacing= to choose)"."""
    name = sampler_name(cfg)
    skip = f" + Skip-Tuning({cfg.skip.rho_bottom}..{cfg.skip.rho_top})" if cfg.skip else ""
    cache = f" + DeepCache(interval={cfg.cache.interval})" if cfg.cache else ""
    cache += guidance_words(cfg)
    if adaptive(cfg):
        tolerances = f"{cfg.sampler.method} at rtol={cfg.sampler.rtol:g}, atol={cfg.sampler.atol:g}"
        return (f"{name}{skip}{cache}, {tolerances}: the solver chooses its steps and NFE from the first {spacing} "
                f"timestep (steps={cfg.steps} sets only that start, T-1 under trailing)")  # fmt: skip
    whose = timesteps.PAPER_SPACING.get(name, ("leading", "the DDIM paper's uniform skip"))
    if spacing != whose[0]:  # zero terminal SNR: trailing for every sampler
        whose = (spacing, "from T-1, pure noise under zero terminal SNR (Lin et al. 2024)")
    own = "" if cfg.spacing else f" (the sampler's own: {whose[1]}; spacing= to choose)"
    return f"{name}{skip}{cache}, {cfg.steps} {spacing} steps{own}"


def guidance_words(cfg: DictConfig) -> str:
    """e.g. " + classifier-free guidance w=2 (rescale 0.7, on sigma in (0.28, 5.42])"; "" without guidance."""
    if not cfg.get("guidance"):
        return ""
    kind = "autoguidance" if cfg.get("guide") else "classifier-free guidance"
    extra = [f"rescale {cfg.guidance_rescale:g}"] if cfg.get("guidance_rescale") else []
    if cfg.get("guidance_interval") is not None:
        lo, hi = cfg.guidance_interval
        extra.append(f"on sigma in ({lo:g}, {hi:g}]")
    return f" + {kind} w={cfg.guidance:g}" + (f" ({', '.join(extra)})" if extra else "")


def record_fid(images: np.ndarray, out: Path, reference, extractor) -> dict:
    result = fid.fid_of(images, reference, extractor)
    print(result)
    (out / "fid.json").write_text(json.dumps(result.as_dict(), indent=2))
    return {f"fid/{k}" if k != "fid" else "fid": v for k, v in result.as_dict().items()}


def logger(cfg: DictConfig, trained: dict):
    """The configured logger, built before sampling (W&B: a run of job type `sample` in the training project)."""
    os.environ.setdefault("WANDB_JOB_TYPE", "sample")
    if trained.get("logger", {}).get("project") and cfg.logger.get("project") == "diffusion":
        cfg.logger.project = trained["logger"]["project"]  # beside the training run it came from
    return instantiate(cfg.logger)


def log(logger, cfg: DictConfig, images: np.ndarray, stats: dict, source: str, trained: dict, spacing: str,
        labels: np.ndarray | None = None) -> None:  # fmt: skip
    """Record the run: its config, figures and (W&B) a grid of samples, one per class for a conditional model."""
    config = {**OmegaConf.to_container(cfg, resolve=True), "source": source, "train_run_id": trained.get("run_id"),
              "spacing": spacing}  # fmt: skip
    logger.log_hyperparams(config)
    logger.log_metrics(stats)
    if isinstance(logger, WandbLogger):
        if labels is None:
            logger.log_image("samples", [grid(images[:64])], caption=[describe(cfg, spacing)])
        else:
            names = trained.get("classes") or []
            classes = [int(k) for k in np.unique(labels)]
            logger.log_image("samples", [grid(images[labels == k][:64]) for k in classes],
                             caption=[names[k] if k < len(names) else f"class {k}" for k in classes])  # fmt: skip
        logger.experiment.summary.update(stats)
    logger.finalize("success")
    loggers.finish_wandb()


def newest_checkpoint() -> Path:
    found = [p for p in (checkpoints.newest(r) for r in SEARCH_ROOTS if Path(r).is_dir()) if p is not None]
    if not found:
        raise UsageError(
            f"no checkpoint found under {' or '.join(SEARCH_ROOTS)}/: train one first "
            "(python train.py experiment=quickstart) or pass ckpt=PATH/TO/last.ckpt or pretrained=DIR"
        )
    path = max(found, key=lambda p: p.stat().st_mtime)
    print(f"using the newest checkpoint: {path}")
    return path
