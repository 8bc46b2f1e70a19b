"""The entry points' options, checked before any model is loaded: every bad value named with its fix, in one line.

sample.py: `check_options`; what needs the model waits for it: steps <= T (the model's T), the sampler's and
DeepCache's own value checks. train.py: `check_train_options` and `check_optimizer`, before the first step (where
Lightning, the DataLoader and torch.optim would fail with a ZeroDivisionError or a ValueError mid-setup).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import ListConfig

from .. import timesteps
from ..errors import UsageError
from ..io.gamma_cache import takes_gamma
from ..sampling.generate import PRECISIONS

__all__ = ["check_options", "check_train_options", "check_optimizer"]

FLAGS = ("use_ema", "grid", "png", "fid", "overwrite")


def check_options(cfg: Mapping, world_size: int = 1) -> None:
    """Raise one UsageError listing every bad option of conf/sample.yaml (`world_size`: processes under torchrun)."""
    problems = []

    def whole(key: str, low: int, meaning: str) -> bool:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{key}={value!r}: use a whole number >= {low} ({meaning})")
            return False
        return True

    whole("batch_size", 1, "images per batch on each process, e.g. 64")
    whole("seed", 0, "image i depends on (seed, i)")
    whole("steps", 1, "sampling steps, at most the model's T")
    if whole("n_samples", 1, "the number of images to draw") and cfg["n_samples"] < world_size:
        problems.append(f"n_samples={cfg['n_samples']} is fewer than the {world_size} processes: ask for at least "
                        f"{world_size} images, or start fewer processes (torchrun --nproc_per_node)")  # fmt: skip
    for key in FLAGS:
        if not isinstance(cfg.get(key), bool):
            problems.append(f"{key}={cfg.get(key)!r}: use true or false")
    spacings = timesteps.NAMES + timesteps.GAMMA_SPACINGS
    if cfg.get("spacing") is not None and cfg.get("spacing") not in spacings:
        problems.append(f"spacing={cfg.get('spacing')!r}: choose one of {', '.join(spacings)}, or null (the "
                        "sampler's own)")  # fmt: skip
    problems += _analytic_problems(cfg)
    if cfg.get("precision") not in PRECISIONS:
        problems.append(f"unknown precision={cfg.get('precision')!r}: choose one of {', '.join(PRECISIONS)}")
    if problem := _device_problem(cfg.get("device")):
        problems.append(problem)
    if cfg.get("ckpt") and cfg.get("pretrained"):
        problems.append("ckpt= and pretrained= are both set: pass either ckpt=PATH or pretrained=DIR, not both")
    ref = cfg.get("fid_ref")
    if cfg.get("fid") is True and ref and str(ref).endswith(".npz") and not Path(str(ref)).is_file():
        problems.append(f"fid_ref={ref}: no such file; pass an .npz with mu and sigma, or leave fid_ref=null")
    if cfg.get("fid") is True and not ref and cfg.get("pretrained"):
        problems.append(
            "fid=true with pretrained=: a diffusers folder does not name its dataset; pass fid_ref=PATH.npz"
        )
    for group in ("sampler", "skip", "cache"):
        problems += _keyword_problems(group, cfg.get(group))
    if problems:
        raise UsageError("; ".join(problems))


def _analytic_problems(cfg: Mapping) -> list[str]:
    """Analytic-DPM: its trajectory needs its sampler, its Gamma needs training images (gamma_M of a dataset)."""
    try:
        analytic = takes_gamma(instantiate(cfg.get("sampler")))
    except Exception:  # no sampler, or one whose own problem _keyword_problems reports
        analytic = False
    problems = []
    if cfg.get("spacing") in timesteps.GAMMA_SPACINGS and not analytic:
        problems.append(f"spacing={cfg.get('spacing')} is Analytic-DPM's optimal trajectory, made from the model's "
                        "Gamma: use it with sampler=analytic_ddpm or sampler=analytic_ddim")  # fmt: skip
    if analytic:
        value = cfg.get("gamma_M")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"gamma_M={value!r}: use a whole number >= 1 (training images for Gamma; 100 is close "
                            "to the paper's 50000)")  # fmt: skip
        if cfg.get("pretrained") and not cfg.get("data"):
            problems.append(
                "an Analytic-DPM sampler with pretrained=: a diffusers folder does not name its dataset, "
                "which Gamma is estimated on; pass data=NAME, e.g. data=cifar10 for google/ddpm-cifar10-32"
            )
    return problems


def _device_problem(device) -> str | None:
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"device={device!r}: use auto, cpu, cuda or cuda:N"
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return f"device={device}: {torch.cuda.device_count()} CUDA GPUs are visible here; use device=auto or cpu"
    return None


def _keyword_problems(group: str, node) -> list[str]:
    """Options the function of a partial config (`_partial_: true`) does not take, e.g. sampler.etta=0.5."""
    if not node:
        return []
    try:
        partial = instantiate(node)
    except InstantiationException as error:
        return [f"{group}: {' '.join(str(error).split())}"]
    parameters = inspect.signature(partial.func).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return []
    options = [n for n, p in parameters.items() if p.default is not p.empty and n not in ("generator", "timesteps")]
    name = getattr(partial.func, "__name__", group)
    problems = [f"{group}.{key} is not an option of {name}: its options are {', '.join(options)}"
                for key in partial.keywords if key not in parameters]  # fmt: skip
    try:
        function = partial.func.__init__ if isinstance(partial.func, type) else partial.func
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that does not resolve: nothing to check against
        hints = {}
    for key, value in partial.keywords.items():
        if key in hints and not _fits(value, hints[key]):
            problems.append(f"{group}.{key}={value!r}: {name} takes {_describe_hint(hints[key])}")
    return problems


def _fits(value, hint) -> bool:
    """Whether a config value is of an annotation's type: bool, int, float (an int is one), str, None, Literal,
    unions and sequences of these; unknown annotations accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, list | tuple | ListConfig) and all(_fits(v, args[0]) for v in value) if args else True
    return True


def _describe_hint(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_hint(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        plural = {bool: "flags", int: "whole numbers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ---------------------------------------------------------------- train.py


def check_train_options(cfg: Mapping) -> None:
    """Raise one UsageError listing every bad trainer and data count of conf/train.yaml."""
    problems = []
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}

    def whole(where: str, value, low: int, meaning: str, allowed: tuple = ()) -> None:
        if value in allowed and not isinstance(value, bool):
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{where}={value!r}: use a whole number >= {low} ({meaning})")

    whole("data.batch_size", data.get("batch_size"), 1, "images per step on each process, e.g. 128")
    whole("data.num_workers", data.get("num_workers", 0), 0, "DataLoader processes; 0 loads in the main process")
    whole("trainer.max_steps", trainer.get("max_steps"), 1, "optimizer steps to train for; -1: no end", (-1,))
    whole("trainer.log_every_n_steps", trainer.get("log_every_n_steps", 50), 1, "steps between logged metrics")
    interval = trainer.get("val_check_interval")
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
            problems.append(f"trainer.val_check_interval={interval!r}: use a whole number of steps >= 1 (e.g. 5000)")
        elif isinstance(interval, float) and interval > 1:
            problems.append(f"trainer.val_check_interval={interval!r}: a fraction lies in (0, 1]; steps are whole "
                            "numbers (e.g. 5000)")  # fmt: skip
    limit = trainer.get("limit_val_batches")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0):
        problems.append(f"trainer.limit_val_batches={limit!r}: use a number of batches >= 0 (0: no validation)")
    if problems:
        raise UsageError("; ".join(problems))


def check_optimizer(optimizer):
    """`optimizer` (a partial: parameters -> torch.optim.Optimizer), once built on a probe parameter: torch's own
    checks (a negative lr, betas outside [0, 1)) say what is wrong now, not from inside Lightning's setup."""
    try:
        optimizer([torch.zeros(1, requires_grad=True)])
    except (TypeError, ValueError) as error:
        raise UsageError(f"optim: {error} (e.g. optim.lr=2e-4, optim.betas=[0.9,0.999])") from None
    return optimizer
