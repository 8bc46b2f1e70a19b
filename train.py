"""Train a diffusion model: `python train.py data=cifar10 schedule=cosine` (configs in conf/, see README)."""

from __future__ import annotations

import os

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from diffusion.cli import conditioning, loggers, resume
from diffusion.cli.launch import job_environment
from diffusion.cli.options import check_optimizer, check_train_options
from diffusion.cli.runs import run_token  # noqa: F401 (registers ${run_token:} for conf/train.yaml's run folders)
from diffusion.errors import reported
from diffusion.io import checkpoints
from diffusion.training import precision
from diffusion.training.consistency import ConsistencyModule, adopt_teacher
from diffusion.training.module import DiffusionModule


def train(cfg: DictConfig) -> DiffusionModule:
    """Build data, model, module, logger and trainer from `cfg` and fit; returns the trained module.

    With `resume=PATH` the checkpoint's config is the base (diffusion.cli.resume): same model, data and W&B run, its
    sections built through diffusion.io.registry. With a `consistency:` section (experiment=cd, ct, pcm) the module is
    a ConsistencyModule, bound to its teacher's weights."""
    overrides, checkpoint, from_file = resume.command_line_overrides(), None, frozenset()
    if cfg.resume:
        checkpoint = checkpoints.load(cfg.resume, option="resume")
        continued = resume.continue_run(cfg, checkpoint["config"], overrides)
        for line in continued.notes:
            rank_zero_info(f"resume: {line}")
        from_file = continued.from_file
    cfg.run_id = cfg.run_id or os.urandom(4).hex()
    check_train_options(cfg)
    teacher = adopt_teacher(cfg, resume.explicit_keys(overrides or [])) if cfg.get("consistency") else None
    build = resume.builder(cfg, from_file | ({"model", "schedule"} if teacher is not None else set()))
    conditioning.prepare_data(cfg)  # conditional=true: labelled batches, and the UNet takes the data's classes
    data = build("data")
    conditioning.wire_model(cfg, data)
    config = OmegaConf.to_container(cfg, resolve=True)  # saved in every checkpoint
    optimizer = check_optimizer(build("optim"))
    plan = precision.plan_step(cfg.trainer, cfg.module, optimizer)  # refuses what would crash at step 1
    rank_zero_info(f"training step: {plan}")

    L.seed_everything(cfg.seed, verbose=False)  # same initial weights on every rank
    schedule = build("schedule")
    kind, extra = (ConsistencyModule, {"teacher": teacher, **cfg.consistency}) if cfg.get("consistency") else (
        DiffusionModule, {})  # fmt: skip
    module = kind(
        build("model"), schedule, optimizer, **{**cfg.module, "grad_clip": plan.grad_clip},
        fused=plan.fused, config=config, **extra,
    )  # fmt: skip
    if checkpoint is not None:  # before Lightning, whose own errors for these are pages long
        checkpoints.check_resumable(checkpoint, module, cfg.resume)
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams(config)  # the full resolved config, as the run's W&B config
    callbacks = [build(f"callbacks.{name}") for name in cfg.callbacks or {}]
    if (
        cfg.trainer.get("enable_progress_bar") is False
    ):  # one switch for the bar (Lightning refuses a bar it is off for)
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, precision=plan.precision, logger=logger, callbacks=callbacks,
        plugins=[checkpoints.AtomicCheckpointIO()],
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=data, ckpt_path=cfg.resume)
    finally:
        loggers.finish_wandb()
    return module


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported(), job_environment():
        train(cfg)


if __name__ == "__main__":
    main()
