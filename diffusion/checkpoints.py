"""Checkpoint files: atomic writes, a last/periodic saving policy, and safe loading with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import UsageError
from . import registry

__all__ = ["AtomicCheckpointIO", "Checkpoints", "CheckpointError", "load", "load_model", "newest"]


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class Checkpoints(L.Callback):
    """Refresh `last.ckpt` every `last_every_n_steps` and when training stops (also on Ctrl-C or an error),
    and keep `step_XXXXXXX.ckpt` every `keep_every_n_steps` (0: never)."""

    def __init__(self, dirpath: str | os.PathLike, last_every_n_steps: int = 1000, keep_every_n_steps: int = 0):
        if last_every_n_steps < 1 or keep_every_n_steps < 0:
            raise ValueError("last_every_n_steps must be >= 1 and keep_every_n_steps >= 0")
        self.dirpath = Path(dirpath)
        self.last_every_n_steps = last_every_n_steps
        self.keep_every_n_steps = keep_every_n_steps
        self._saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.keep_every_n_steps and step % self.keep_every_n_steps == 0:
            trainer.save_checkpoint(self.dirpath / f"step_{step:07d}.ckpt")
        if step % self.last_every_n_steps == 0:
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt | torch.cuda.OutOfMemoryError):
            self._save_last(trainer)  # the state is sound: keep the work done since the last save

    def _save_last(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.last_path)
            self._saved_step = trainer.global_step
            for logger in trainer.loggers if trainer.is_global_zero else []:
                if isinstance(logger, WandbLogger):  # the run page says where its weights are
                    logger.experiment.summary["checkpoint"] = str(self.last_path.resolve())


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our checkpoints on the CPU without unpickling arbitrary objects (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass ckpt=PATH to a .ckpt file written by train.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a foreign pickle, or not a torch file at all
        raise CheckpointError(f"cannot read {path} as a checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'state_dict' and 'config' entries)")
    return checkpoint


def newest(root: str | os.PathLike, name: str = "last.ckpt") -> Path | None:
    """The most recently written `name` below `root` (e.g. the last run's last.ckpt), or None."""
    found = [p for p in Path(root).rglob(name) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ---------------------------------------------------------------- models from checkpoints


def load_model(checkpoint: dict[str, Any], *, use_ema: bool = True, device: str | torch.device = "cpu"):
    """The network (EMA or raw weights, in eval mode) and the schedule described by a checkpoint's config.

    Returns (model, schedule). Both are built through diffusion.registry: the config may only name this project's
    own UNet and schedules, with plain arguments, so a crafted checkpoint cannot call anything else.
    """
    config = checkpoint["config"]
    for key in ("model", "schedule"):
        if not isinstance(config, dict) or not isinstance(config.get(key), dict):
            raise CheckpointError(f"the checkpoint's config has no '{key}' section: it was not written by train.py")
    model = registry.build("model", config["model"], where="checkpoint config model")
    schedule = registry.build("schedule", config["schedule"], where="checkpoint config schedule")
    prefix = "ema." if use_ema else "model."
    state = {
        k[len(prefix) :].replace("_orig_mod.", ""): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(prefix)
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"the checkpoint's {prefix[:-1]} weights do not fit its model config: {error}") from None
    return model.to(device).eval().requires_grad_(False), schedule.to(device)
