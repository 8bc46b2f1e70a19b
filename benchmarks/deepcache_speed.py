"""DeepCache speed on the DDPM CIFAR-10 UNet (35.7M parameters): DDIM without cache vs DeepCache at N = 2, 3, 5, 10.

    python benchmarks/deepcache_speed.py [--batch 16] [--steps 20] [--device cpu] [--intervals 2 3 5 10]
    python benchmarks/deepcache_speed.py --macs-only      # writes benchmarks/results/deepcache_macs.md, no timing

Prints two markdown tables: (1) wall time of a whole DDIM run per setting, the measured speed-up, the MACs
speed-up it should approach (steps / (full + cached * share), share from `cached_cost`), the calls of each kind
and the mean absolute difference of the final images from the uncached run (x0 in [-1, 1]); (2) the MACs
speed-up of each branch at 100 steps. The paper (CIFAR-10, 100 DDIM steps): 1.40x / 1.61x / 1.85x / 2.07x
measured at N = 2 / 3 / 5 / 10, against MACs ratios of 1.47 / 1.72 / 2.03 / 2.32.

`--macs-only` counts MACs on the meta device (no weights, one forward per branch) and prints, and saves, the
MACs ratios at 100 DDIM steps of our default branch (1) and of the official README's CIFAR-10 `--branch 2`,
under the uniform, the official non-uniform (centre 50, pow 1.4) and our non-uniform schedule, with the cost
of a cached call per branch under our count and under the official counter's conventions.

No trained checkpoint is used: the weights are DDPM's init with every weight jittered by a seeded N(0, 0.05^2),
so that the output is not zero. Timings do not depend on the weights; the image differences only show that the
cache changes the result by a bounded amount (a trained model's features change more smoothly across steps).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root
from benchmarks.testbed import CIFAR10, jittered
from diffusion import sampling, schedule, timesteps
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import DeepCache, cached_cost, macs_speedup
from diffusion.wrappers.macs import count_ops

PAPER = {2: (1.40, 1.47), 3: (1.61, 1.72), 5: (1.85, 2.03), 10: (2.07, 2.32)}  # measured, MACs


def ddim_runs(model: UNet, x_T: torch.Tensor, sched, ts: torch.Tensor, intervals: list[int], *,
              branch: int | None = None, schedule: str = "uniform", repeats: int = 1,
              dtype: torch.dtype | None = None) -> tuple[dict, dict, dict]:  # fmt: skip
    """DDIM over `ts` from x_T without cache (key None) and with DeepCache at each N in `intervals`, interleaved
    `repeats` times: (best seconds, final x0, DeepCache wrapper) by N. `dtype`: autocast for the network."""
    device = x_T.device
    nets = {n: DeepCache(model, ts, interval=n, branch=branch, schedule=schedule) for n in intervals}

    def run(n: int | None) -> tuple[float, torch.Tensor]:
        net = model if n is None else nets[n]
        if n is not None:
            net.reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            x0 = sampling.ddim(net, x_T, sched, ts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, x0.float()

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        warm = DeepCache(model, ts, interval=2, branch=branch)  # warm-up: a full and a cached call at this batch
        for t in ts[:2]:
            warm(x_T, torch.full((len(x_T),), int(t), device=device))
    seconds, images = {}, {}
    for _ in range(repeats):  # interleaved, so that a noisy machine hurts every setting alike
        for n in [None, *intervals]:
            s, images[n] = run(n)
            seconds[n] = min(s, seconds.get(n, float("inf")))
    return seconds, images, nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (the paper: 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--branch", type=int, default=None, help="default: after the first resolution level")
    parser.add_argument("--schedule", default="uniform", choices=["uniform", "nonuniform", "official"])
    parser.add_argument("--macs-only", action="store_true", help="only the MACs tables; save deepcache_macs.md")
    parser.add_argument("--repeats", type=int, default=1, help="time each setting this often, keep the fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.macs_only:
        text = macs_tables()
        print(text)
        out = Path(__file__).resolve().parent / "results" / "deepcache_macs.md"
        out.write_text(text)
        print(f"written to {out}")
        return

    device = torch.device(args.device)
    model = jittered(UNet(**CIFAR10)).eval().to(device)
    sched, ts = schedule.linear(T=1000), timesteps.leading(args.steps, 1000)
    x_T = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    share = cached_cost(model, args.branch)
    settings = [None, *args.intervals]
    seconds, images, nets = ddim_runs(model, x_T, sched, ts, args.intervals, branch=args.branch,
                                      schedule=args.schedule, repeats=args.repeats)  # fmt: skip

    branch = DeepCache(model, branch=args.branch, interval=1).branch
    schedule_name = args.schedule
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


# ---------------------------------------------------------------- MACs ratios: our default branch vs the official one


def official_count(model: nn.Module, call) -> int:
    """MACs as the official DeepCache counter (DeepCache/flops.py) counts them: convs and linear layers with their
    bias adds, GroupNorm at 2 per element, and nothing for the attention products (torch.bmm, not a module)."""
    return count_ops(model, call, {
        nn.Conv2d: lambda m, args, out: out.numel() * (m.in_channels // m.groups * math.prod(m.kernel_size)
                                                       + (m.bias is not None)),
        nn.Linear: lambda m, args, out: out.numel() * m.in_features + (out.shape[-1] if m.bias is not None else 0),
        nn.GroupNorm: lambda m, args, out: args[0].numel() * (2 if m.affine else 1),
    })  # fmt: skip


def macs_tables(steps: int = 100, intervals: tuple[int, ...] = (2, 3, 5, 10), center: float = 0.5,
                power: float = 1.4) -> str:  # fmt: skip
    """Markdown: MACs ratios of branches 1 (ours) and 2 (the official CIFAR-10 --branch) at `steps` DDIM steps under
    each schedule of full steps, and the cost of a cached call per branch (MACs counted on the meta device)."""
    with torch.device("meta"):
        model = UNet(**CIFAR10)
    x = torch.zeros(1, 3, 32, 32, device="meta")
    t = torch.zeros(1, dtype=torch.int64, device="meta")
    schedules = [("uniform", "uniform"), ("official", "official non-uniform"), ("nonuniform", "our non-uniform")]
    share = {b: cached_cost(model, b) for b in (1, 2)}
    lines = [
        f"### DeepCache MACs ratios, CIFAR-10 UNet (35.7M parameters), {steps} DDIM steps",
        "",
        f"Non-uniform schedules at centre {center} (the official `--center {round(center * steps)}`) and power "
        f"{power} (`--pow {power}`). MACs ratio = steps / (full + cached x share), the full steps listed last (same "
        f"order); a cached call costs {share[1]:.3f}"
        f" of a full one at branch 1 and {share[2]:.3f} at branch 2. The paper (CIFAR-10): 1.47 / 1.72 / 2.03 / "
        "2.32 at N = 2 / 3 / 5 / 10.",
        "",
        "| N | " + " | ".join(f"branch {b}, {name}" for b in (1, 2) for _, name in schedules) + " | full steps |",
        "|---|" + "---|" * (2 * len(schedules) + 1),
    ]
    for n in intervals:
        counts = {key: len(DeepCache(model, interval=n, schedule=key, center=center, power=power).pick(steps))
                  for key, _ in schedules}  # fmt: skip
        cells = [f"{macs_speedup(share[b], counts[key], steps):.2f}x" for b in (1, 2) for key, _ in schedules]
        full = " / ".join(str(counts[key]) for key, _ in schedules)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {full} |")
    official = {n: DeepCache(model, interval=n, schedule="official", center=center, power=power).pick(steps)
                for n in intervals}  # fmt: skip
    lines += ["", "Full steps (indices into the 100 steps) of the official non-uniform rule:", ""]
    lines += [f"- N = {n}: {official[n]}" for n in intervals]
    lines += [
        "",
        "Cost of a cached call per branch (official `--branch` numbering = ours), under our count (convs, linear "
        "layers, attention products) and under the official counter's conventions (bias adds and GroupNorm "
        "counted, attention products not):",
        "",
        "| branch | cached feature | cached / full, ours | cached / full, official counter | full GMACs, official "
        "counter | MACs ratio at N = 2 / 3 / 5 / 10 (uniform, official counter) |",
        "|---|---|---|---|---|---|",
    ]
    for b in range(model.num_levels * (model.num_res_blocks + 1) - 1):
        cache, deep = DeepCache(model, interval=1, branch=b), {}
        full = official_count(model, lambda c=cache, d=deep: d.setdefault("h", c._full(x, t)[1]))
        s = official_count(model, lambda c=cache, d=deep: c._shallow(x, t, d["h"])) / full
        ratios = " / ".join(f"{macs_speedup(s, math.ceil(steps / n), steps):.2f}" for n in intervals)
        lines.append(f"| {b} | {list(deep['h'].shape)} | {cached_cost(model, b):.3f} | {s:.3f} | {full / 1e9:.2f} "
                     f"| {ratios} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
