"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`) for the diffusion module.

Lightning's FSDPStrategy (FSDP1) cannot run on CPU processes: Lightning refuses it for `accelerator='cpu'`, and
torch's FullyShardedDataParallel refuses a module whose device is the CPU ("FSDP needs a non-CPU accelerator
device"). FSDP2 works on CPU with gloo as on GPUs with NCCL, so the CPU tests walk the path a GPU run takes.
"""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from packaging.version import Version
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..errors import UsageError
from ..unet import ResBlock, UNet

__all__ = ["FSDP", "shard_unets", "MIN_TORCH", "torch_shards_right"]

# FSDP2 as used here, checked with the tests' two CPU processes against DDP: torch 2.6 cannot shard on CPU processes,
# 2.7 refuses the EMA's update of a sharded network (mixed Tensor and DTensor in _foreach_lerp_), 2.8's sharded
# gradient norms came out twice DDP's (gloo; NCCL unchecked); from 2.9 on (checked: 2.9.1, 2.11, 2.14) every step
# matches. Older versions are refused rather than trusted untested.
MIN_TORCH = (2, 9)


def torch_shards_right() -> bool:
    """Whether this torch's FSDP2 is one that trains here as DDP does (MIN_TORCH or later)."""
    return Version(torch.__version__).release[:2] >= MIN_TORCH


def shard_unets(module: nn.Module, mesh: DeviceMesh) -> None:
    """fully_shard every ResBlock, then every UNet, inside `module` over the 1-D data-parallel `mesh`.

    Each ResBlock is its own unit, so only one block's full weights exist at a time; the UNet unit holds the rest
    (embedding, convs, attention). The network and its EMA copy are both UNets, sharded alike: every parameter
    becomes a DTensor cut along dim 0 the same way in both, so the EMA update is a local lerp of matching shards
    and sampling from the EMA gathers its weights block by block on every rank. Already sharded modules are kept.

    The UNet units reshard after forward too (FSDP2 keeps a root's weights gathered, expecting a backward): the
    EMA never runs backward, and a validation or sampling forward under no_grad would otherwise leave plain,
    unsharded weights behind for the EMA update and the checkpoint to trip over.
    """
    for unet in [m for m in module.modules() if isinstance(m, UNet)]:
        for block in unet.modules():
            if isinstance(block, ResBlock) and not isinstance(block, FSDPModule):
                fully_shard(block, mesh=mesh)
        if not isinstance(unet, FSDPModule):
            fully_shard(unet, mesh=mesh, reshard_after_forward=True)


class FSDP(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure sharded data parallelism over all processes of all nodes.

    The strategy shards the module's UNets itself (`shard_unets`), after the module's `configure_model` and
    before the optimizer is built, as FSDP1's auto-wrap policy did. Checkpoints are one file with the full,
    gathered state dict (written by rank zero), so they load anywhere, sharded or not, and resume here.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta = default_pg_timeout) -> None:
        if not torch_shards_right():
            raise UsageError(
                f"trainer=fsdp needs torch >= {'.'.join(map(str, MIN_TORCH))} (this is torch {torch.__version__}, "
                "whose FSDP2 failed our check against DDP: see diffusion/strategies.py): upgrade torch, or use "
                "trainer=ddp"
            )
        super().__init__(
            save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout
        )

    def setup_environment(self) -> None:
        # Known only now (devices=-1). Lightning's "auto" would make each GPU of a node a tensor-parallel rank.
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        shard_unets(self.model, self.device_mesh["data_parallel"])
        super().setup(trainer)
