"""Training throughput of our unet_cifar10 against diffusers' UNet2DModel with the same configuration.

One training step = forward + backward + Adam step on the DDPM simple loss (`eps_loss`: fresh t and noise each
step) on a fixed random batch; `--clip 1 --fused --ema 0.9999` adds what train.py's step does besides. The two
models are timed in one process, interleaved (ours, theirs, ours, ...) after a warm-up, so a load change on a
shared machine hits both alike; the table reports median images/s and the ratio ours / theirs.

    python benchmarks/train_speed.py                       # fp32, batch 16, this CPU
    python benchmarks/train_speed.py --precision bf16      # bf16 autocast
    python benchmarks/train_speed.py --device cuda --precision bf16 --compile --channels-last --batch 128
    python benchmarks/train_speed.py --clip 1 --fused --ema 0.9999    # train.py's whole step (GPU: gpu_report.py)
    python benchmarks/train_speed.py --profile             # where the time goes, per model (torch.profiler)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root
from benchmarks.testbed import CIFAR10, PARAMS, Eps, diffusers_unet, machine
from diffusion.schedule import linear
from diffusion.training.losses import eps_loss
from diffusion.training.module import ema_update
from diffusion.unet import UNet

# ---------------------------------------------------------------- one training step


def make_step(
    model: torch.nn.Module,
    *,
    batch: int,
    shape: tuple[int, int, int] = (3, 32, 32),
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    channels_last: bool = False,
    clip: float | None = None,
    fused: bool = False,
    ema_decay: float | None = None,
) -> Callable[[], None]:
    """A closure running one training step on a fixed batch x0 [batch, *shape]: the DDPM loss (`eps_loss`, fresh t
    and noise each call) forward and backward, optionally under bf16 autocast, the global gradient norm clipped to
    `clip`, an Adam step (`fused`: one kernel for all parameters) and, with `ema_decay`, the EMA update."""
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=fused)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay is not None else None
    forward = torch.compile(model) if compile else model
    schedule = linear(T=1000).to(device)
    x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device, memory_format=fmt)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = eps_loss(forward, schedule, x0)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, model, ema_decay)

    return step


def timed(step: Callable[[], None], iters: int, device: str) -> list[float]:
    """Seconds per step, one number per step (each step waits for the GPU: steadier rounds, not peak speed)."""
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def profile(name: str, step, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        step()
    print(f"\n### {name}: one step, by self time\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=6, help="timed steps per model, interleaved one by one")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--clip", type=float, default=None, help="clip the global gradient norm to this (DDPM: 1)")
    parser.add_argument("--fused", action="store_true", help="fused Adam (one kernel for all parameters)")
    parser.add_argument("--ema", type=float, default=None, help="also update an EMA copy with this decay")
    parser.add_argument("--profile", action="store_true", help="after timing, profile one step of each model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)  # dropout masks and init: the same stream for every run of this script
    ours = UNet(**CIFAR10)
    theirs = diffusers_unet(ours)
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    assert counts == [PARAMS, PARAMS], f"parameter counts {counts} differ from {PARAMS}: not the same network"
    options = dict(batch=args.batch, device=args.device, precision=args.precision, compile=args.compile,
                   channels_last=args.channels_last, clip=args.clip, fused=args.fused, ema_decay=args.ema)  # fmt: skip
    steps = {"ours (diffusion.unet.UNet)": make_step(ours, **options),
             "diffusers UNet2DModel": make_step(Eps(theirs), **options)}  # fmt: skip

    for step in steps.values():
        timed(step, args.warmup, args.device)
    times = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            times[name] += timed(step, 1, args.device)

    extras = [("torch.compile", args.compile), ("channels-last", args.channels_last), ("fused Adam", args.fused),
              (f"clip {args.clip}", args.clip is not None), (f"EMA {args.ema}", args.ema is not None)]  # fmt: skip
    print(
        f"\nunet_cifar10 ({PARAMS:,} params) training step, batch {args.batch}, {args.precision}"
        f"{''.join(f', {name}' for name, on in extras if on)}; {machine(args.device)}; "
        f"median of {args.iters} interleaved steps after {args.warmup} warm-up\n"
    )
    print("| model | median s/step | images/s | min s/step |")
    print("|---|---:|---:|---:|")
    rate = {}
    for name, ts in times.items():
        rate[name] = args.batch / statistics.median(ts)
        print(f"| {name} | {statistics.median(ts):.3f} | {rate[name]:.2f} | {min(ts):.3f} |")
    ours_rate, theirs_rate = rate.values()
    ours_times, theirs_times = times.values()
    paired = statistics.median(b / a for a, b in zip(ours_times, theirs_times, strict=True))
    print(f"\nratio ours / diffusers (images/s): {ours_rate / theirs_rate:.3f} from the medians, {paired:.3f} as the")
    print("median of the per-round ratios (each round times both models back to back: steadier under shared load)")

    if args.profile:
        for name, step in steps.items():
            profile(name, step, rows=25)


if __name__ == "__main__":
    main()
