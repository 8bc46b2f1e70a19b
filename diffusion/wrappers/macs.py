"""Multiply-accumulates (MACs) of a model's forward: convs, linear layers and attention products, counted by forward
hooks over one call. DeepCache's cost ratios (`deepcache.cached_cost`) and the benchmarks' official-convention
counts are built on it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..unet import Attention

__all__ = ["count_macs", "count_ops"]


def count_macs(model: nn.Module, call: Callable[[], object]) -> int:
    """Multiply-accumulates of the convs, linear layers and attention products in `model` during `call()`."""

    def attention(m: Attention, args, out: Tensor) -> int:  # q k^T and softmax(.) v, each HW x HW x C
        b, c, height, width = args[0].shape
        return 2 * b * (height * width) ** 2 * c

    return count_ops(model, call, {
        nn.Conv2d: lambda m, args, out: out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size),
        nn.Linear: lambda m, args, out: out.numel() * m.in_features,
        Attention: attention,
    })  # fmt: skip


def count_ops(model: nn.Module, call: Callable[[], object], counters: dict[type, Callable[..., int]]) -> int:
    """The sum, over every forward of a submodule of a type in `counters` during `call()` (under no_grad), of
    counters[type](module, inputs, output): MACs by whichever convention the counters encode."""
    total = 0

    def hook(counter: Callable[..., int]) -> Callable[..., None]:
        def add(m: nn.Module, args, out: Tensor) -> None:
            nonlocal total
            total += counter(m, args, out)

        return add

    hooks = [m.register_forward_hook(hook(f)) for m in model.modules() for kind, f in counters.items()
             if isinstance(m, kind)]  # fmt: skip
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in hooks:
            handle.remove()
    return total
