"""DeepCache speed on the DDPM CIFAR-10 UNet (35.7M parameters): DDIM without cache vs DeepCache at N = 2, 3, 5, 10.

    python benchmarks/deepcache_speed.py [--batch 16] [--steps 20] [--device cpu] [--intervals 2 3 5 10]

Prints two markdown tables: (1) wall time of a whole DDIM run per setting, the measured speed-up, the MACs
speed-up it should approach (steps / (full + cached * share), share from `cached_cost`), the calls of each kind
and the mean absolute difference of the final images from the uncached run (x0 in [-1, 1]); (2) the MACs
speed-up of each branch at 100 steps. The paper (CIFAR-10, 100 DDIM steps): 1.40x / 1.61x / 1.85x / 2.07x
measured at N = 2 / 3 / 5 / 10, against MACs ratios of 1.47 / 1.72 / 2.03 / 2.32.

No trained checkpoint is used: the weights are DDPM's init with every weight jittered by a seeded N(0, 0.05^2),
so that the output is not zero. Timings do not depend on the weights; the image differences only show that the
cache changes the result by a bounded amount (a trained model's features change more smoothly across steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusion import samplers, schedule, timesteps
from diffusion.deepcache import DeepCache, cached_cost, macs_speedup
from diffusion.unet import UNet

CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
PAPER = {2: (1.40, 1.47), 3: (1.61, 1.72), 5: (1.85, 2.03), 10: (2.07, 2.32)}  # measured, MACs


def jittered(model: UNet, seed: int = 0) -> UNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (the paper: 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--branch", type=int, default=None, help="default: after the first resolution level")
    parser.add_argument("--nonuniform", action="store_true", help="the paper's non-uniform schedule of full steps")
    parser.add_argument("--repeats", type=int, default=1, help="time each setting this often, keep the fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = jittered(UNet(**CIFAR10)).eval().to(device)
    sched, ts = schedule.linear(T=1000), timesteps.leading(args.steps, 1000)
    x_T = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    share = cached_cost(model, args.branch)
    settings = [None, *args.intervals]
    nets = {n: DeepCache(model, ts, interval=n, branch=args.branch, uniform=not args.nonuniform) for n in settings[1:]}

    def run(n: int | None) -> tuple[float, torch.Tensor]:
        net = model if n is None else nets[n]
        if n is not None:
            net.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x0 = samplers.ddim(net, x_T, sched, ts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, x0

    with torch.no_grad():  # warm-up: a full and a cached call at this batch size
        warm = DeepCache(model, ts, interval=2, branch=args.branch)
        for t in ts[:2]:
            warm(x_T, torch.full((args.batch,), int(t), device=device))
    seconds, images = {}, {}
    for _ in range(args.repeats):  # interleaved, so that a noisy machine hurts every setting alike
        for n in settings:
            s, images[n] = run(n)
            seconds[n] = min(s, seconds.get(n, float("inf")))

    branch = DeepCache(model, branch=args.branch, interval=1).branch
    schedule_name = "non-uniform" if args.nonuniform else "uniform"
    print(
        f"\nDDIM, {args.steps} steps, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads; "
        f"branch {branch}, {schedule_name}; a cached call costs {share:.3f} of a full one (MACs)\n"
    )
    print("| N | full / cached calls | seconds | speed-up | MACs speed-up | paper: speed-up / MACs | mean abs diff |")
    print("|---|---|---|---|---|---|---|")
    base = seconds[None]
    print(f"| no cache | {args.steps} / 0 | {base:.1f} | 1.00x | 1.00x | | 0 |")
    for n in settings[1:]:
        full = len(nets[n].full_steps)
        macs = macs_speedup(share, full, args.steps)
        paper = "{:.2f}x / {:.2f}x".format(*PAPER[n]) if n in PAPER else ""
        diff = (images[n] - images[None]).abs().mean().item()
        print(
            f"| {n} | {full} / {args.steps - full} | {seconds[n]:.1f} | {base / seconds[n]:.2f}x | {macs:.2f}x "
            f"| {paper} | {diff:.4f} |"
        )

    levels, n_blocks = model.num_levels, model.num_res_blocks
    k = n_blocks + 1
    print(f"\nMACs speed-up by branch, 100 uniform steps (branch b: level b // {k}, position b % {k}; {n_blocks}: the")
    print("level's downsample)\n")
    print("| branch | cached / full MACs | " + " | ".join(f"N={n}" for n in (2, 3, 5, 10)) + " |")
    print("|---|---|" + "---|" * 4)
    for b in range(levels * (n_blocks + 1) - 1):
        s = cached_cost(model, b)
        cells = " | ".join(f"{macs_speedup(s, len(range(0, 100, n)), 100):.2f}x" for n in (2, 3, 5, 10))
        print(f"| {b} | {s:.3f} | {cells} |")


if __name__ == "__main__":
    main()
