"""What the benchmarks share: the DDPM CIFAR-10 UNet (ours, and diffusers' UNet2DModel built to the same layout),
seeded non-zero weights, a timer that waits for the GPU, and the machine's name for the tables.

The scripts in this folder import it as `benchmarks.testbed`; run as scripts (`python benchmarks/x.py`) they first
put the repository root on sys.path, so the same import works from the tests and from the command line.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusion.io.export import diffusers_config
from diffusion.unet import UNet

__all__ = ["CIFAR10", "PARAMS", "jittered", "diffusers_unet", "Eps", "seconds", "machine"]

# model=unet_cifar10 (conf/model/unet_cifar10.yaml) at 32x32: Ho et al. 2020, Appendix B
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
PARAMS = 35_746_307


def jittered(model: nn.Module, seed: int = 0) -> nn.Module:
    """DDPM's init zeroes the output layers, so a fresh UNet returns 0; add a seeded N(0, 0.05^2) to every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    return model


def diffusers_unet(ours: UNet):
    """UNet2DModel with the layout of `ours` (the config diffusion.io.export writes, google/ddpm-* settings)."""
    from diffusers import UNet2DModel  # a benchmark-only dependency: pip install -e ".[test]"

    return UNet2DModel(**{k: v for k, v in diffusers_config(ours).items() if not k.startswith("_")})


class Eps(nn.Module):
    """diffusers returns an output object; unwrap it so both models are called as model(x, t) -> eps."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def seconds(fn: Callable[[], object], device: torch.device | str, n: int = 1) -> float:
    """Wall seconds of n calls of fn. On a GPU the calls are bracketed by CUDA events and the time is read once the
    queue has drained, so kernels still running when fn returns are counted and no sync sits between the calls."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - begin


def machine(device: torch.device | str) -> str:
    """The GPU's or the CPU's name, with torch's version (and the CPU's cores and threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        cuda = torch.version.cuda or "?"
        return f"{torch.cuda.get_device_name(device)}, CUDA {cuda}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
