"""Checkpoint files: atomic writes, a last/periodic saving policy, and safe loading with clear errors."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from ..errors import UsageError
from ..schedule import PREDICTIONS
from ..weights import check_state
from ..wrappers.prediction import Prediction
from . import registry

__all__ = ["AtomicCheckpointIO", "Checkpoints", "CheckpointError", "load", "load_model", "check_resumable",
           "newest"]  # fmt: skip


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

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: Any = None) -> dict:
        """What Lightning resumes from, read by the same loader as sample.py's (`load`): data only, checked."""
        return load(path, option="resume")


class Checkpoints(L.Callback):
    """Refresh `last.ckpt` every `last_every_n_steps` and when training stops (also on Ctrl-C or out of memory, where
    that is safe), and keep `step_XXXXXXX.ckpt` every `keep_every_n_steps` (0: never).

    A checkpoint is never written with non-finite weights: the good file stays. Temporary files that a killed save
    left behind (`.NAME.PID.tmp`) are removed when training starts.
    """

    def __init__(self, dirpath: str | os.PathLike, last_every_n_steps: int = 1000, keep_every_n_steps: int = 0):
        if last_every_n_steps < 1 or keep_every_n_steps < 0:
            raise UsageError(
                f"callbacks.checkpoints: last_every_n_steps={last_every_n_steps} must be >= 1 and "
                f"keep_every_n_steps={keep_every_n_steps} >= 0 (0: keep none)"
            )
        self.dirpath = Path(dirpath)
        self.last_every_n_steps = last_every_n_steps
        self.keep_every_n_steps = keep_every_n_steps
        self._saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            folders = {self.dirpath} | ({Path(trainer.ckpt_path).parent} if trainer.ckpt_path else set())
            for stale in remove_stale_temporaries(*folders):
                rank_zero_info(f"removed {stale}, left by a save that was killed")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.keep_every_n_steps and step % self.keep_every_n_steps == 0:
            self._save(trainer, pl_module, self.dirpath / f"step_{step:07d}.ckpt")
        if step % self.last_every_n_steps == 0:
            self._save_last(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # The state is sound after Ctrl-C, SIGTERM (kill, a cluster's preemption: Lightning stops between steps) or
        # OOM: keep the work done since the last save. With several processes a save is a collective (every rank
        # gathers), and the others may be stuck in an all-reduce: it would hang.
        if isinstance(exception, KeyboardInterrupt | SIGTERMException | torch.cuda.OutOfMemoryError):
            if trainer.world_size == 1:
                rank_zero_info(f"{type(exception).__name__}: saving step {trainer.global_step} to {self.last_path}")
                self._save_last(trainer, pl_module)
            else:
                rank_zero_info(f"not saving on {type(exception).__name__} with {trainer.world_size} processes "
                               f"(it could hang); {self.last_path} holds step {self._saved_step}")  # fmt: skip

    def _save_last(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step and self._save(trainer, pl_module, self.last_path):
            self._saved_step = trainer.global_step
            for logger in trainer.loggers if trainer.is_global_zero else []:
                if isinstance(logger, WandbLogger):  # the run page says where its weights are
                    logger.experiment.summary["checkpoint"] = str(self.last_path.resolve())

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> bool:
        if not _all_finite(trainer, pl_module):
            rank_zero_warn(f"step {trainer.global_step}: the weights are not finite; {path} is left as it was")
            return False
        trainer.save_checkpoint(path, weights_only=False)  # the whole run: weights, optimizer, loops, callbacks
        return True


def _all_finite(trainer: L.Trainer, module: torch.nn.Module) -> bool:
    """True when every parameter and buffer (of this rank's shard) is finite on every rank."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    local = all(bool(torch.isfinite(t).all()) for t in tensors)
    return trainer.strategy.reduce_boolean_decision(local, all=True)


def remove_stale_temporaries(*folders: Path) -> list[Path]:
    """Delete `.NAME.PID.tmp` files of AtomicCheckpointIO whose process no longer runs; returns what was removed."""
    removed = []
    for folder in folders:
        for path in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else ():
            pid = path.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _running(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: str | os.PathLike, option: str = "ckpt") -> dict[str, Any]:
    """Read one of our checkpoints on the CPU as data: tensors and plain values only (weights_only), from an archive
    that cannot inflate past its size, with a config that OmegaConf cannot resolve into code (plain.check_file_data).

    `option` names the command-line option that gave the path (ckpt, resume, teacher), for the messages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass {option}=PATH to a .ckpt file written by train.py")
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a foreign pickle, or not a torch file at all
        raise CheckpointError(f"cannot read {path} as a checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'state_dict' and 'config' entries)")
    registry.check_file_data(checkpoint["config"], str(path), "config")
    return checkpoint


def _check_archive(path: Path) -> None:
    """Refuse a file that torch.load could inflate past its own size: torch.save writes a zip archive of stored
    (uncompressed) members, so compressed or overlapping members are not ours (a 2.6 MB deflated file held 1 GiB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"cannot read {path} as a checkpoint: it is not a torch.save archive ({error})") from None
    packed = next((m.filename for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise CheckpointError(f"{path} holds a compressed member ({packed}), which torch.save never writes; refusing "
                              "it, as it could inflate to far more memory than the file's size")  # fmt: skip
    if sum(m.file_size for m in members) > path.stat().st_size:
        raise CheckpointError(f"{path}'s members add up to more than the file's size (they overlap): not a "
                              "torch.save archive; refusing it")  # fmt: skip


def newest(root: str | os.PathLike, name: str = "last.ckpt") -> Path | None:
    """The most recently written `name` below `root` (e.g. the last run's last.ckpt), or None."""
    found = [p for p in Path(root).rglob(name) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ---------------------------------------------------------------- models from checkpoints


def load_model(checkpoint: dict[str, Any], *, use_ema: bool = True, device: str | torch.device = "cpu"):
    """The network (EMA or raw weights, in eval mode) and the schedule described by a checkpoint's config; for a
    consistency model (a `consistency` section), the network wrapped in a ConsistencyModel
    (diffusion.sampling.consistency), whose eps carries x_t to the consistency function's output (sample it with
    sampler=consistency).

    Returns (model, schedule). Both are built through diffusion.io.registry: the config may only name this project's
    own UNet and schedules, with plain arguments, so a crafted checkpoint cannot call anything else. A network that
    predicts x0 or v (module.prediction) comes wrapped as an eps-model (diffusion.wrappers.prediction). The network is
    built on the meta device and checked against the weights before any memory is taken, so a config that asks for
    a network the weights do not hold (a width of 200,000) is refused instead of allocated.
    """
    config = checkpoint["config"]
    for key in ("model", "schedule"):
        if not isinstance(config, dict) or not isinstance(config.get(key), dict):
            raise CheckpointError(f"the checkpoint's config has no '{key}' section: it was not written by train.py")
    with torch.device("meta"):
        model = registry.build("model", config["model"], where="checkpoint config model")
    schedule = registry.build("schedule", config["schedule"], where="checkpoint config schedule")
    prefix = "ema." if use_ema else "model."
    if not isinstance(checkpoint["state_dict"], dict):
        raise CheckpointError("the checkpoint's state_dict is not a mapping of weights: it was not written by train.py")
    state = {
        k[len(prefix) :].replace("_orig_mod.", ""): v
        for k, v in checkpoint["state_dict"].items()
        if isinstance(k, str) and k.startswith(prefix)
    }
    expected = model.state_dict()
    check_state(expected, state, f"the checkpoint's {prefix[:-1]} weights", "its model config")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    model, schedule = model.to(device).eval().requires_grad_(False), schedule.to(device)
    prediction = _prediction(config)
    if prediction != "eps":  # a network that predicts x0 or v, as the eps-model every sampler takes
        model = Prediction(model, schedule, prediction)
    if config.get("consistency") is not None:  # a CD / CT / PCM student: f as an eps-model (any sampler can run it)
        from ..sampling.consistency import ConsistencyModel

        return ConsistencyModel(model, schedule, _phases(config["consistency"])).to(device), schedule
    return model, schedule


def _prediction(config: dict) -> str:
    """What the checkpoint's network predicts (module.prediction; eps for checkpoints written before the option)."""
    module = config.get("module") or {}
    prediction = module.get("prediction", "eps") if isinstance(module, dict) else None
    if prediction not in PREDICTIONS:
        raise CheckpointError(
            f"the checkpoint's module.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}"
        )
    return prediction


# What Lightning needs to continue a run, beside the weights: without `loops` it would start again at step 0.
RESUME_KEYS = ("loops", "optimizer_states", "lr_schedulers", "global_step", "epoch")


def check_resumable(checkpoint: dict[str, Any], module: torch.nn.Module, path: str | os.PathLike) -> None:
    """CheckpointError, in one line, unless `checkpoint` can continue training `module`: the progress Lightning
    restores (RESUME_KEYS), every weight of the module (check_state) and an optimizer state that fits them."""
    absent = [k for k in RESUME_KEYS if k not in checkpoint]
    if absent or not isinstance(checkpoint.get("loops"), dict) or "fit_loop" not in checkpoint["loops"]:
        missing = absent[0] if absent else "loops.fit_loop"
        raise CheckpointError(
            f"{path} cannot be resumed: it has no '{missing}' (the training progress train.py's checkpoints hold); "
            f"sample from it with `python sample.py ckpt={path}`, or start a new run without resume="
        )
    check_state(module.state_dict(), checkpoint["state_dict"], f"{path}'s weights", "this run's model")
    states = checkpoint["optimizer_states"]
    params = list(module.model.parameters()) if hasattr(module, "model") else list(module.parameters())
    ok = isinstance(states, list) and len(states) == 1 and isinstance(states[0], dict)
    groups = states[0].get("param_groups") if ok else None
    ids = [i for g in groups for i in g.get("params", ())] if isinstance(groups, list) else []
    ok = ok and isinstance(groups, list) and all(isinstance(g, dict) for g in groups) and len(ids) == len(params)
    state = states[0].get("state") if ok else None
    ok = ok and isinstance(state, dict)
    for key, slots in state.items() if ok else ():
        index = ids.index(key) if key in ids else None
        ok = ok and index is not None and isinstance(slots, dict)
        for value in slots.values() if ok else ():
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape != params[index].shape:
                ok = False
    if not ok:
        raise CheckpointError(
            f"{path}'s optimizer state does not fit this run's {len(params)} parameters: it was not written by "
            "train.py for this model; start a new run without resume= (its weights: sample.py ckpt=...)"
        )


def _phases(section: Any) -> int:
    """PCM's number of phases from a checkpoint's `consistency` section (1 for CD and CT), checked as plain data."""
    if not isinstance(section, dict):
        raise CheckpointError("the checkpoint's config 'consistency' is not a mapping: it was not written by train.py")
    for key, value in section.items():
        registry.check_plain(value, f"checkpoint config consistency.{key}")
    phases = section.get("phases", 1)
    if isinstance(phases, bool) or not isinstance(phases, int) or phases < 1:
        raise CheckpointError(f"the checkpoint's consistency.phases={phases!r} is not a whole number >= 1")
    return phases
