"""Training throughput of our unet_cifar10 against diffusers' UNet2DModel with the same configuration.

One training step = forward + backward + Adam step on the DDPM simple loss (MSE to eps) with random data.
The two models are timed in one process, interleaved (ours, theirs, ours, ...) after a warm-up, so a load
change on a shared machine hits both alike; the table reports median images/s and the ratio ours / theirs.

    python benchmarks/train_speed.py                       # fp32, batch 16, this CPU
    python benchmarks/train_speed.py --precision bf16      # bf16 autocast
    python benchmarks/train_speed.py --device cuda --precision bf16 --compile --channels-last --batch 128
    python benchmarks/train_speed.py --profile             # where the time goes, per model (torch.profiler)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel  # a benchmark-only dependency: pip install -e ".[test]"

from diffusion.pretrained import diffusers_config
from diffusion.unet import UNet

# model=unet_cifar10 (conf/model/unet_cifar10.yaml) at 32x32: Ho et al. 2020, Appendix B
CONFIG = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
PARAMS = 35_746_307


def diffusers_unet(ours: UNet) -> UNet2DModel:
    """UNet2DModel with the layout of `ours` (the config diffusion.pretrained exports, google/ddpm-* settings)."""
    return UNet2DModel(**{k: v for k, v in diffusers_config(ours).items() if not k.startswith("_")})


class Eps(torch.nn.Module):
    """diffusers returns an output object; unwrap it so both models are called as model(x, t) -> eps."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


# ---------------------------------------------------------------- one training step


def make_step(model: torch.nn.Module, args: argparse.Namespace):
    """A closure running one forward + backward + Adam step on fixed random (x_t, t, eps)."""
    device = torch.device(args.device)
    model = model.to(device).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device, memory_format=fmt)
    eps = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = F.mse_loss(forward(x, t).float(), eps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, iters: int, device: str) -> list[float]:
    """Seconds per step, one number per step."""
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


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=6, help="timed steps per model, interleaved one by one")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--channels-last", action="store_true")
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
    ours = UNet(**CONFIG)
    theirs = diffusers_unet(ours)
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    assert counts == [PARAMS, PARAMS], f"parameter counts {counts} differ from {PARAMS}: not the same network"
    steps = {"ours (diffusion.unet.UNet)": make_step(ours, args), "diffusers UNet2DModel": make_step(Eps(theirs), args)}

    for step in steps.values():
        timed(step, args.warmup, args.device)
    times = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            times[name] += timed(step, 1, args.device)

    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(
        f"\nunet_cifar10 ({PARAMS:,} params) training step, batch {args.batch}, {args.precision}"
        f"{', torch.compile' if args.compile else ''}{', channels-last' if args.channels_last else ''}; "
        f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
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
