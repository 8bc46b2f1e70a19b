"""One decision for the numeric path of a training step: precision, fused optimizer and gradient clipping.

They are decided together because they interact: Lightning refuses to clip for an optimizer that unscales its own
gradients (fused Adam under a GradScaler), and FSDP refuses Lightning's norm clipping. So the module clips by itself
(`DiffusionModule.clip_and_check`, which knows the GradScaler's scale and FSDP2's sharded gradients), Lightning's
own clipping stays off, and an optimizer is fused wherever torch has a fused kernel for the device, CPU included:
the CPU tests walk the GPU path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["StepPlan", "resolve_precision", "plan_step"]

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass(frozen=True)
class StepPlan:
    """What a training step runs with: Lightning's `precision`, a `fused` optimizer, clipping at `grad_clip`."""

    precision: str
    fused: bool
    grad_clip: float | None  # max global gradient norm; None: no clipping (the norm is still checked for finiteness)
    device: str  # cuda or cpu: where the step runs

    def __str__(self) -> str:
        clip = f"clip grad norm at {self.grad_clip:g}" if self.grad_clip else "no clipping"
        return f"{self.precision} on {self.device}, {'fused' if self.fused else 'unfused'} optimizer, {clip}"


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """`auto` -> bf16-mixed on a CUDA GPU that supports it, else 32-true; anything else as Lightning spells it."""
    if str(precision) != "auto":
        return str(precision)
    if _device(accelerator) == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def plan_step(trainer: Any, module: Any, optimizer: Callable[..., torch.optim.Optimizer] | None = None) -> StepPlan:
    """Decide precision, fusing and clipping from the `trainer` and `module` config sections; refuse what cannot run.

    `optimizer` is the partial optimizer (conf/optim), used to see whether it has a fused kernel.
    """
    get = trainer.get if hasattr(trainer, "get") else lambda key, default=None: getattr(trainer, key, default)
    accelerator = str(get("accelerator", "auto"))
    precision = resolve_precision(get("precision", "auto"), accelerator)
    if precision not in PRECISIONS:
        raise UsageError(f"trainer.precision={precision!r} is not one of: auto, {', '.join(PRECISIONS)}")
    if get("gradient_clip_val", None) is not None:
        raise UsageError(
            f"trainer.gradient_clip_val={get('gradient_clip_val')} is not used here: the module clips the gradient "
            "norm itself (it works with fused optimizers, mixed precision and FSDP). Set module.grad_clip="
            f"{get('gradient_clip_val')} instead and leave trainer.gradient_clip_val unset"
        )
    if int(get("accumulate_grad_batches", 1) or 1) != 1:
        raise UsageError(
            "trainer.accumulate_grad_batches is not supported (the training step is written out by hand): raise "
            "data.batch_size, or train on more devices (trainer=ddp), for a larger effective batch"
        )
    strategy = get("strategy", None)
    strategy = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy or "")
    if strategy.lower().startswith("fsdp") or strategy.endswith("FSDPStrategy"):
        raise UsageError(
            f"trainer.strategy={strategy!r} is Lightning's FSDP1, which this module does not clip correctly and "
            "which cannot run on CPU test processes: use trainer=fsdp (FSDP2, diffusion.training.strategies.FSDP)"
        )
    clip = module.get("grad_clip", 1.0) if hasattr(module, "get") else getattr(module, "grad_clip", 1.0)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0):
        raise UsageError(f"module.grad_clip={clip!r} must be a number >= 0 (0 or null: no clipping; DDPM clips at 1)")
    device = _device(accelerator)
    fused = optimizer is not None and _has_fused_kernel(optimizer, device)
    return StepPlan(precision=precision, fused=fused, grad_clip=float(clip) if clip else None, device=device)


def _device(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _has_fused_kernel(optimizer: Callable[..., torch.optim.Optimizer], device: str) -> bool:
    """True when `optimizer` takes fused=True and torch has the kernel for `device` (CUDA; CPU since torch 2.4)."""
    cls = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    if "fused" not in inspect.signature(cls).parameters:
        return False
    if device == "cuda" and not torch.cuda.is_available():
        return True  # decided on a machine without the GPU (a config check): CUDA always has the kernel
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True
