"""Class labels for train.py and sample.py: wiring conditional=true into the data and the UNet, choosing each
image's label, building guidance (classifier-free or autoguidance) around the network, and refusing what cannot
work in one line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from ..errors import UsageError
from ..io import checkpoints
from ..sampling.consistency import ConsistencyModel
from ..wrappers import prediction
from ..wrappers.guidance import Guided, find, num_classes_of

__all__ = ["prepare_data", "wire_model", "image_labels", "check_sampling", "load_guide", "guided", "condition"]


# ---------------------------------------------------------------- train.py


def prepare_data(cfg: DictConfig) -> None:
    """conditional=true: the data yields (image, label) batches. Nothing changes for an unconditional run."""
    if not cfg.get("conditional"):
        if (cfg.get("model") or {}).get("num_classes"):
            raise UsageError(f"model.num_classes={cfg.model.num_classes} with conditional=false: pass conditional=true "
                             "(the class count comes from the data) and leave model.num_classes unset")  # fmt: skip
        return
    distilled = cfg.get("consistency") and cfg.consistency.get("method") == "cd"
    if distilled and not (cfg.get("model") or {}).get("num_classes"):
        raise UsageError(f"conditional=true distils a class-conditional teacher, and teacher={cfg.get('teacher')} is "
                         "unconditional: drop conditional=true (or distil a teacher trained with it)")  # fmt: skip
    with open_dict(cfg):
        cfg.data.conditional = True


def wire_model(cfg: DictConfig, data: Any) -> None:
    """conditional=true: the UNet takes as many classes as `data` (the built DataModule) has, and the run's config
    records their names (`classes`, for sample.py's grids and W&B captions)."""
    if not cfg.get("conditional"):
        return
    names = [str(name) for name in data.classes()]
    if cfg.model.get("num_classes") not in (None, len(names)):
        whose = f"the teacher's {cfg.teacher}" if cfg.get("teacher") else "model.num_classes"
        raise UsageError(f"{whose} has {cfg.model.num_classes} classes, but the data has {len(names)}: leave "
                         "model.num_classes unset (conditional=true takes it from the data), or distil on the "
                         "teacher's data")  # fmt: skip
    with open_dict(cfg):
        cfg.model.num_classes = len(names)
        cfg.classes = names


# ---------------------------------------------------------------- sample.py


def image_labels(labels: Sequence[int] | None, num_classes: int, n: int) -> torch.Tensor:
    """The label of each of n images: image i gets labels[i % len(labels)], or class i % num_classes with no
    labels (every class in turn): it depends on i alone, not on the batch size or the number of processes."""
    if labels is None:
        return torch.arange(n) % num_classes
    chosen = torch.as_tensor(list(labels), dtype=torch.int64)
    return chosen[torch.arange(n) % len(chosen)]


def check_sampling(cfg: DictConfig, model: nn.Module, source: str) -> int | None:
    """The model's class count (None: unconditional) after refusing labels or classifier-free guidance that the model
    cannot take, and labels outside its classes."""
    k = num_classes_of(prediction.inner(model))
    labels, scale, guide = cfg.get("labels"), cfg.get("guidance", 0.0), cfg.get("guide")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale < float("inf"):
        raise UsageError(f"guidance={scale!r}: use a number >= 0 (Ho & Salimans's w; 0: none)")
    if isinstance(model, ConsistencyModel) and (scale or guide):
        raise UsageError(f"{source} is a consistency model: it was distilled from a teacher guided at a fixed scale "
                         "(consistency.guidance), so it takes no guidance= or guide=; drop them")  # fmt: skip
    if k is None:
        if labels is not None:
            raise UsageError(f"labels={list(labels)}: {source} is unconditional (trained without conditional=true), "
                             "so it takes no labels: drop labels=")  # fmt: skip
        if scale > 0 and not guide:
            raise UsageError(f"guidance={scale:g} without guide=: classifier-free guidance needs a class-conditional "
                             f"model, and {source} is unconditional; autoguidance (guide=WEAKER.ckpt) needs "
                             "none")  # fmt: skip
        return None
    if labels is not None:
        bad = [y for y in labels if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < k]
        if not list(labels) or bad:
            raise UsageError(f"labels={list(labels)}: each label must be a class 0..{k - 1} of this model "
                             f"({k} classes); null draws every class in turn")  # fmt: skip
    return k


def load_guide(cfg: DictConfig, model: nn.Module, schedule, device) -> nn.Module | None:
    """Autoguidance's guide (guide=PATH: a train.py checkpoint of the same kind, EMA weights as use_ema says), its raw
    network; refused in one line where it predicts another target, has another schedule, image shape or labels."""
    if not cfg.get("guide"):
        return None
    if cfg.get("pretrained"):
        raise UsageError("guide= takes a train.py checkpoint, guiding a model of ours; drop it with pretrained=")
    net, guide_schedule = checkpoints.load_model(checkpoints.load(cfg.guide, option="guide"), use_ema=cfg.use_ema,
                                                 device=device)  # fmt: skip
    mine, theirs = _kind(model, schedule), _kind(net, guide_schedule)
    if mine != theirs:
        diff = ", ".join(f"{key} {theirs[key]} (the model's: {mine[key]})" for key in mine if mine[key] != theirs[key])
        raise UsageError(f"guide={cfg.guide} is not a model of the same kind: it has {diff}; autoguidance needs a "
                         "weaker model (smaller or trained for less) of the same data, schedule and "
                         "target")  # fmt: skip
    return prediction.inner(net)


def _kind(model: nn.Module, schedule) -> dict:
    net = prediction.inner(model)
    return {"prediction": getattr(model, "prediction", "eps"), "classes": num_classes_of(net),
            "input": (getattr(net, "in_channels", None), getattr(net, "resolution", None)),
            "schedule": (schedule.name, schedule.T, round(float(schedule.alphas_cumprod.sum()), 6))}  # fmt: skip


def guided(cfg: DictConfig, net: nn.Module, num_classes: int | None, schedule, guide: nn.Module | None) -> nn.Module:
    """`net` (the UNet, maybe in DeepCache / Skip-Tuning / autocast) with labels and guidance, or `net` itself for
    an unconditional model without a guide."""
    if (num_classes is None and guide is None) or find(net) is not None:  # a consistency model's: labelled already
        return net
    interval = cfg.get("guidance_interval")
    try:
        return Guided(net, num_classes or 0, scale=cfg.get("guidance", 0.0), rescale=cfg.get("guidance_rescale", 0.0),
                      interval=None if interval is None else list(interval), guide=guide,
                      schedule=schedule)  # fmt: skip
    except ValueError as error:
        raise UsageError(f"guidance options: {error}") from error


def condition(net: nn.Module, labels: torch.Tensor | None) -> Callable[[Sequence[int]], None] | None:
    """generate()'s per-batch hook: the batch's labels set on the Guided wrapper inside `net` (None: nothing to set)."""
    found = find(net)
    if found is None or labels is None:
        return None

    def hook(batch: Sequence[int]) -> None:
        found.condition(labels[torch.as_tensor(list(batch))])

    return hook


def as_array(labels: torch.Tensor | None) -> np.ndarray | None:
    return None if labels is None else labels.numpy().astype(np.int64)
