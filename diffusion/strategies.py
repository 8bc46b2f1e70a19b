"""Multi-device strategies that need more than a config entry."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from .unet import ResBlock, UNet

__all__ = ["fsdp"]


def fsdp(**kwargs: Any) -> FSDPStrategy:
    """FSDP that shards each UNet, and each ResBlock inside it, as its own unit.

    The network and its EMA copy are both UNets, so they are flattened and sharded the same way: every rank
    holds matching shards of the two, and the EMA update stays a local, communication-free lerp. Checkpoints
    hold the full (gathered) state dict, so they load anywhere, sharded or not.
    """
    kwargs.setdefault("auto_wrap_policy", {UNet, ResBlock})
    kwargs.setdefault("state_dict_type", "full")
    return FSDPStrategy(**kwargs)
