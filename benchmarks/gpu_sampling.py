"""The sampling half of benchmarks/gpu_report.py: DDIM with our sampler against diffusers' DDIMPipeline on the same
weights, with and without torch.compile, and DeepCache against the MACs ratio and the paper.

Both sides start from the same x_T: ours draws it as DDIMPipeline does (one `torch.randn` of the batch from a
generator seeded on the device), and both return images in [0, 1] on the host, so each run does the same work and
the RMS difference of the images checks that the two pipelines compute the same thing. DDIMPipeline clips x0
(its scheduler's clip_sample=True), so ours is asked to clip too (`clip=True`; the DDIM paper's code, and so our
default, does not) and takes eps consistent with the clipped x0, which is DDIMPipeline's
use_clipped_model_output=True. (DDIMPipeline returns a
tensor here, output_type="pt", as numpy has no bf16 for the bf16-weights run.)
"""

from __future__ import annotations

import copy
import math
import statistics
import traceback
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.deepcache_speed import PAPER, ddim_runs
from benchmarks.testbed import diffusers_unet, seconds
from diffusion import sampling, schedule, timesteps
from diffusion.io.export import scheduler_config
from diffusion.io.pretrained import to_diffusers
from diffusion.sampling.generate import Autocast
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import cached_cost, macs_speedup

__all__ = ["sampling_rows", "deepcache_rows"]


def _pipeline(ours: UNet, sched, dtype: torch.dtype | None, compile: bool):
    """diffusers' DDIMPipeline around a UNet2DModel holding our weights; `dtype` None: float32 weights (the caller
    autocasts), else weights cast to it, as `torch_dtype=` loads them."""
    from diffusers import DDIMPipeline, DDIMScheduler

    theirs = diffusers_unet(ours)
    theirs.load_state_dict(to_diffusers(ours.state_dict(), ours.num_levels))
    theirs = theirs.to(next(ours.parameters()).device, dtype=dtype or torch.float32).eval()
    pipe = DDIMPipeline(unet=theirs, scheduler=DDIMScheduler.from_config(scheduler_config(sched)))
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def sampling_rows(model: UNet, *, batch: int, steps: int, device: torch.device, compile: bool, repeats: int,
                  extras: Callable[[], bool]) -> list[tuple[str, float, float]]:  # fmt: skip
    """(setting, images/s, RMS difference of the images from ours eager) of DDIM-`steps` (eta = 0, leading spacing,
    x0 clipped) at `batch`, the network in bf16. Settings: ours eager, ours under torch.compile (default mode; with
    CUDA graphs, mode="reduce-overhead", when `extras()` still allows it), diffusers' DDIMPipeline with autocast,
    with bf16 weights, and compiled (the last two when `extras()` allows)."""
    model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    sched = schedule.linear(T=1000).to(device)
    ts, bf16 = timesteps.leading(steps, sched.T), torch.bfloat16
    shape = (batch, model.in_channels, model.resolution, model.resolution)

    def ours(net) -> Callable[[], Tensor]:
        def run() -> Tensor:
            x_T = torch.randn(shape, generator=torch.Generator(device).manual_seed(0), device=device)
            return (sampling.ddim(net, x_T, sched, ts, clip=True) / 2 + 0.5).clamp(0, 1).float().cpu()

        return run

    options = dict(batch_size=batch, eta=0.0, num_inference_steps=steps, use_clipped_model_output=True)

    def theirs(pipe, autocast: bool) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.autocast(device.type, dtype=bf16, enabled=autocast):
                generator = torch.Generator(device).manual_seed(0)
                out = pipe(generator=generator, output_type="pt", **options).images
            return out.float().cpu()

        return run

    runs = {"ours, eager": lambda: ours(Autocast(model, bf16))}
    if compile:
        runs["ours, torch.compile"] = lambda: ours(Autocast(torch.compile(model), bf16))
    runs["diffusers DDIMPipeline, autocast"] = lambda: theirs(_pipeline(model, sched, None, False), True)
    optional = {"diffusers DDIMPipeline, bf16 weights": lambda: theirs(_pipeline(model, sched, bf16, False), False)}
    if compile:
        optional["ours, torch.compile mode=reduce-overhead (CUDA graphs)"] = lambda: ours(
            Autocast(torch.compile(model, mode="reduce-overhead"), bf16))  # fmt: skip
        optional["diffusers DDIMPipeline, autocast, torch.compile"] = lambda: theirs(
            _pipeline(model, sched, None, True), True)  # fmt: skip
    rows = []
    for name, build in [*runs.items(), *optional.items()]:
        if name in optional and not extras():  # each optional setting only while the time budget lasts
            rows.append((f"{name}: skipped (time budget)", math.nan, math.nan))
            continue
        try:
            rows.append(_measure(name, build(), batch, device, repeats, rows[0][3] if rows else None))
        except Exception as error:  # compile or another library failing costs its row, not the table
            if not rows:
                raise
            traceback.print_exc()
            rows.append((f"{name}: failed ({type(error).__name__}, traceback above the table)", math.nan, math.nan))
    return [row[:3] for row in rows]


def _measure(name: str, run: Callable[[], Tensor], batch: int, device: torch.device, repeats: int,
             reference: Tensor | None) -> tuple[str, float, float, Tensor]:  # fmt: skip
    """(name, images/s as the median of `repeats` runs after one warm-up run, RMS difference from reference, images)."""
    with torch.no_grad():
        images = run()  # warm-up: compilation, CUDA graph recording, cuDNN autotuning
        times = [seconds(run, device) for _ in range(repeats)]
    rms = float("nan") if reference is None else (images - reference).pow(2).mean().sqrt().item()
    return name, batch / statistics.median(times), rms, images


def deepcache_rows(model: UNet, *, batch: int, steps: int, intervals: list[int], device: torch.device,
                   repeats: int, dtype: torch.dtype | None) -> list[tuple]:  # fmt: skip
    """(N, full calls, cached calls, seconds, measured speed-up, MACs speed-up, the paper's measured speed-up, mean
    |x0 - x0 without cache|) of DDIM-`steps` with DeepCache at each N; N None: no cache."""
    model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    sched, ts = schedule.linear(T=1000).to(device), timesteps.leading(steps, 1000)
    x_T = torch.randn(batch, model.in_channels, model.resolution, model.resolution,
                      generator=torch.Generator(device).manual_seed(1), device=device)  # fmt: skip
    secs, images, nets = ddim_runs(model, x_T, sched, ts, intervals, repeats=repeats, dtype=dtype)
    share, base = cached_cost(model), secs[None]
    rows = [(None, steps, 0, base, 1.0, 1.0, None, 0.0)]
    for n in intervals:
        full = len(nets[n].full_steps)
        diff = (images[n] - images[None]).abs().mean().item()
        paper = PAPER[n][0] if n in PAPER else None
        rows.append((n, full, steps - full, secs[n], base / secs[n], macs_speedup(share, full, steps), paper, diff))
    return rows
