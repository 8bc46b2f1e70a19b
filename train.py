"""Train a diffusion model: `python train.py data=cifar10 schedule=cosine` (configs in conf/, see README)."""

from __future__ import annotations

import os

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion import checkpoints, loggers
from diffusion.errors import reported
from diffusion.launch import job_environment, resolve_precision
from diffusion.runs import run_token  # noqa: F401 (registers ${run_token:} for conf/train.yaml's run folders)
from diffusion.training import DiffusionModule


def train(cfg: DictConfig) -> DiffusionModule:
    """Build data, model, module, logger and trainer from `cfg` and fit; returns the trained module."""
    L.seed_everything(cfg.seed, verbose=False)  # same initial weights on every rank
    if cfg.resume:  # continue the same W&B run, so its charts go on from the checkpoint's step
        cfg.run_id = checkpoints.load(cfg.resume)["config"].get("run_id")
    cfg.run_id = cfg.run_id or os.urandom(4).hex()
    config = OmegaConf.to_container(cfg, resolve=True)  # saved in every checkpoint

    schedule = instantiate(cfg.schedule)
    module = DiffusionModule(instantiate(cfg.model), schedule, instantiate(cfg.optim), **cfg.module, config=config)
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams(config)  # the full resolved config, as the run's W&B config
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        logger=logger,
        callbacks=[instantiate(c) for c in (cfg.callbacks or {}).values()],
        plugins=[checkpoints.AtomicCheckpointIO()],
    )
    torch.manual_seed(cfg.seed + 1 + trainer.global_rank)  # each rank draws its own t and noise
    try:
        trainer.fit(module, datamodule=instantiate(cfg.data), ckpt_path=cfg.resume)
    finally:
        loggers.finish_wandb()
    return module


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported(), job_environment():
        train(cfg)


if __name__ == "__main__":
    main()
