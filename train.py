"""Train a diffusion model: `python train.py data=cifar10 schedule=cosine` (configs in conf/, see README)."""

from __future__ import annotations

import os

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from diffusion import checkpoints, loggers, precision, resume
from diffusion.consistency_module import ConsistencyModule, adopt_teacher
from diffusion.errors import reported
from diffusion.launch import job_environment
from diffusion.runs import run_token  # noqa: F401 (registers ${run_token:} for conf/train.yaml's run folders)
from diffusion.training import DiffusionModule


def train(cfg: DictConfig) -> DiffusionModule:
    """Build data, model, module, logger and trainer from `cfg` and fit; returns the trained module.

    With `resume=PATH` the checkpoint's config is the base (diffusion.resume): same model, data and W&B run.
    With a `consistency:` section (experiment=cd, ct, pcm) the module is a ConsistencyModule."""
    if cfg.resume:
        for line in resume.continue_run(cfg, checkpoints.load(cfg.resume)["config"], resume.command_line_overrides()):
            rank_zero_info(f"resume: {line}")
    cfg.run_id = cfg.run_id or os.urandom(4).hex()
    teacher = adopt_teacher(cfg) if cfg.get("consistency") else None  # CD: the teacher's model and schedule
    config = OmegaConf.to_container(cfg, resolve=True)  # saved in every checkpoint
    # Plain Python arguments: torch 2.6's Adam keeps `betas` as given, and a ListConfig in its state would make every
    # checkpoint unreadable under torch.load(weights_only=True).
    optimizer = instantiate(cfg.optim, _convert_="all")
    plan = precision.plan_step(cfg.trainer, cfg.module, optimizer)  # refuses what would crash at step 1
    rank_zero_info(f"training step: {plan}")

    L.seed_everything(cfg.seed, verbose=False)  # same initial weights on every rank
    schedule = instantiate(cfg.schedule)
    kind, extra = (ConsistencyModule, {"teacher": teacher, **cfg.consistency}) if cfg.get("consistency") else (
        DiffusionModule, {})  # fmt: skip
    module = kind(
        instantiate(cfg.model), schedule, optimizer, **{**cfg.module, "grad_clip": plan.grad_clip},
        fused=plan.fused, config=config, **extra,
    )  # fmt: skip
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams(config)  # the full resolved config, as the run's W&B config
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        precision=plan.precision,
        logger=logger,
        callbacks=[instantiate(c) for c in (cfg.callbacks or {}).values()],
        plugins=[checkpoints.AtomicCheckpointIO()],
    )
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
