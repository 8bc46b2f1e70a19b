"""Lightning callbacks for what a run shows while it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from .images import grid, save_png, to_uint8

__all__ = ["SampleGrid"]


class SampleGrid(L.Callback):
    """Every `every_n_steps`, draw `n` images from the EMA weights with `steps` DDIM steps (eta = 0) from the
    same noise each time, save the grid as `samples/step_XXXXXXX.png` and log it as an image."""

    def __init__(self, every_n_steps: int = 5000, n: int = 64, steps: int = 50, seed: int = 0) -> None:
        if every_n_steps < 1 or n < 1 or steps < 1:
            raise ValueError("every_n_steps, n and steps must be >= 1")
        self.every_n_steps, self.n, self.steps, self.seed = every_n_steps, n, steps, seed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        # Every rank samples (a sharded model needs all of them); rank zero writes and logs.
        image = grid(to_uint8(pl_module.sample(self.n, self.steps, seed=self.seed)))
        if not trainer.is_global_zero:
            return
        save_png(image, Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [image], step=step, caption=[f"step {step}, DDIM {self.steps} steps"])
