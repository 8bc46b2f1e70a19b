"""Lightning callbacks for what a run shows while it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from ..evaluation.fid import Inception, frechet_distance, inception_features, reference_stats_for, stats
from ..images import grid, save_png, to_uint8
from .module import DiffusionModule

__all__ = ["SampleGrid", "FID", "StepProgressBar"]


class SampleGrid(L.Callback):
    """Every `every_n_steps`, draw `n` images from the EMA weights with the module's `sample` (DDIM, eta = 0, for a
    DDPM; consistency sampling for a ConsistencyModule) in `steps` steps from the same noise each time, save the grid
    as `<name>/step_XXXXXXX.png` and log it as the image `name` (two grids, e.g. 1 and 2 steps, need two names)."""

    def __init__(self, every_n_steps: int = 5000, n: int = 64, steps: int = 50, seed: int = 0,
                 name: str = "samples") -> None:  # fmt: skip
        if every_n_steps < 1 or n < 1 or steps < 1:
            raise ValueError("every_n_steps, n and steps must be >= 1")
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"name={name!r} must be letters, digits and underscores (it names a folder)")
        self.every_n_steps, self.n, self.steps, self.seed, self.name = every_n_steps, n, steps, seed, name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        # Every rank samples (a sharded model needs all of them); rank zero writes and logs.
        image = grid(to_uint8(pl_module.sample(self.n, self.steps, seed=self.seed)))
        if not trainer.is_global_zero:
            return
        save_png(image, Path(trainer.default_root_dir) / self.name / f"step_{step:07d}.png")
        how = "DDIM" if type(pl_module).sample is DiffusionModule.sample else type(pl_module).__name__
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(self.name, [image], step=step, caption=[f"step {step}, {how} {self.steps} steps"])


class FID(L.Callback):
    """Every `every_n_steps` (0: never, the default), FID of `n` EMA samples (DDIM, `steps` steps) against the
    training set's cached statistics, logged as `val/fid`. A few thousand samples track progress; paper figures
    need 50k from sample.py (FID is biased upwards at small n, so compare runs at the same n)."""

    def __init__(self, every_n_steps: int = 0, n: int = 5000, steps: int = 50, batch_size: int = 250,
                 stats_dir: str = "data/fid_stats", seed: int = 0) -> None:  # fmt: skip
        if every_n_steps < 0 or n < 2 or steps < 1 or batch_size < 1:
            raise ValueError("FID needs every_n_steps >= 0 (0 turns it off), n >= 2, steps >= 1 and batch_size >= 1")
        self.every_n_steps, self.n, self.steps, self.batch_size = every_n_steps, n, steps, batch_size
        self.stats_dir, self.seed = stats_dir, seed
        self._net, self._reference = None, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # At the start, not 10k steps in: a missing weight file or dataset stops the run before it trains.
        if self.every_n_steps and trainer.is_global_zero:
            self._net = Inception().to(pl_module.device)
            self._reference = reference_stats_for(
                trainer.datamodule, self.stats_dir, extractor=self._net, device=pl_module.device, progress=False
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        # Every rank samples (a sharded model needs all of them); rank zero scores and logs.
        images = [
            to_uint8(pl_module.sample(min(self.batch_size, self.n - i), self.steps, seed=self.seed + i))
            for i in range(0, self.n, self.batch_size)
        ]
        if not trainer.is_global_zero:
            return
        features = inception_features(images, extractor=self._net, device=pl_module.device, progress=False)
        mu, sigma, _ = self._reference
        fid = frechet_distance(*stats(features), mu, sigma)
        for logger in trainer.loggers:  # once, at this step (self.log would repeat it at later steps)
            logger.log_metrics({"val/fid": fid}, step=step)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar counts the batches of an epoch; our data stream is endless (one epoch), so it showed
    `1560/?` with neither total nor ETA. This bar counts optimizer steps towards `trainer.max_steps`, from the step
    a resumed run starts at (so its rate and ETA measure this session's steps only)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.n = bar.initial = trainer.global_step
        bar.set_description("Training (steps)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and self._should_update(step, bar.total) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
