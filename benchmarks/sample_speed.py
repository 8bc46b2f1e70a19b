"""Sampling speed on the DDPM CIFAR-10 UNet (35.7M parameters): every sampler, DeepCache, and the sampler's overhead.

    python benchmarks/sample_speed.py                                   # batch 16, 10/20/50/100 steps (slow on a CPU)
    python benchmarks/sample_speed.py --batch 4 --steps 10 20 --cache-steps 20 --estimate-batch 16 --threads 2
    python benchmarks/sample_speed.py --device cuda --precision bf16    # the real table, on a GPU
    python benchmarks/sample_speed.py --profile ddim                    # where one run's time goes (torch.profiler)

Prints markdown tables:
1. seconds per image of each sampler at each number of steps, with its NFE and its overhead: the sampling time
   over the time of NFE bare UNet forwards at the same batch, so 1.000 means the loop adds nothing. The bare
   forwards are timed beside the sampling so that a load change on a shared machine hits both alike: on a CPU
   (`--pairing call`) each model call gets a twin, one bare forward on the same input right after it, and the
   overhead is the median call / twin ratio plus "outside calls", the run's time outside the model calls over the
   twins' time; on a GPU (`--pairing run`) each whole run sits beside a block of NFE bare forwards (the order
   alternating between repeats), and the overhead is the median over repeats. "loop" is a run's time with the
   network taken out (a model that returns a fixed eps) over the bare forwards: the sampler's arithmetic alone.
2. with --estimate-batch B: seconds per image at batch B, derived as NFE x (one bare forward at B) / B x the
   sampler's measured overhead, for --estimate-steps (the NFE counted by running the sampler with the free model).
3. DeepCache at N = 2, 3, 5 under the same base sampler without cache: measured speed-up, MACs speed-up (from the
   calls of each kind and `cached_cost`) and the mean absolute difference of the final images (x0 in [-1, 1]).

No trained checkpoint is used: the weights are DDPM's init jittered by a seeded N(0, 0.05^2) (as in
deepcache_speed.py). Timings do not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root
from benchmarks.testbed import CIFAR10, jittered, machine
from diffusion import sampling, schedule, timesteps
from diffusion.sampling.generate import PRECISIONS, Autocast
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import DeepCache, cached_cost, macs_speedup

SAMPLERS = ("ddpm", "ddim", "pndm", "s_pndm", "plms", "dpm_solver")
T = 1000


class Free:
    """A model that costs nothing: returns a fixed eps and counts its calls (the NFE)."""

    def __init__(self, eps: Tensor) -> None:
        self.eps, self.calls = eps, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.eps


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn(), waiting for the GPU on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def bare(net: Callable[[Tensor, Tensor], Tensor], x: Tensor, n: int) -> None:
    """n bare forwards of the network: what a sampler's NFE model calls cost with no sampler around them."""
    t = torch.full((len(x),), T // 2, dtype=torch.int64, device=x.device)
    for _ in range(n):
        net(x, t)


class Paired:
    """The network with a twin: after each call, one more bare forward on the same input, each timed apart, so that
    a load change on a shared CPU hits a call and its twin alike. Nothing waits for a GPU here: CPU only."""

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.net, self.calls, self.twins = net, [], []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        start = time.perf_counter()
        eps = self.net(x, t)
        middle = time.perf_counter()
        bare(self.net, x, 1)
        self.calls.append(middle - start)
        self.twins.append(time.perf_counter() - middle)
        return eps


def side_by_side(args, name: str, net, x_T: Tensor, sched, ts: Tensor, nfe: int, flip: bool) -> tuple:
    """(seconds of a sampling run, seconds of NFE bare forwards, call / twin ratios, seconds outside the calls).

    Call pairing: the run with twins (`Paired`), its time less the twins'; one ratio per call, and the time the
    sampler spends outside the model calls. Run pairing: a whole run, then NFE bare forwards (or the reverse).
    """
    if args.pairing == "call":
        paired = Paired(net)
        total = timed(partial(sample, name, paired, x_T, sched, ts), x_T.device)[0]
        run, fwd = total - sum(paired.twins), sum(paired.twins)
        return run, fwd, [a / b for a, b in zip(paired.calls, paired.twins, strict=True)], run - sum(paired.calls)
    pair = [partial(sample, name, net, x_T, sched, ts), partial(bare, net, x_T, nfe)]
    seconds = [0.0, 0.0]
    for i in (1, 0) if flip else (0, 1):
        seconds[i] = timed(pair[i], x_T.device)[0]
    return seconds[0], seconds[1], [seconds[0] / seconds[1]], None


def sample(name: str, net, x_T: Tensor, sched, ts: Tensor) -> Tensor:
    """One run of sampler `name` (ddpm draws its noise from a seeded generator on x_T's device)."""
    generator = torch.Generator(x_T.device).manual_seed(2) if name == "ddpm" else None
    return getattr(sampling, name)(net, x_T, sched, ts, generator=generator)


# ---------------------------------------------------------------- the tables


def sampler_table(args, net, x_T, sched, device) -> None:
    """Table 1, then table 2 (derived from each sampler's overhead, the median over its steps)."""
    steps = sorted(set(args.steps) | set(args.estimate_steps if args.estimate_batch else ()))
    eps = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3)).to(device)
    nfe, loop = {}, {}
    for name in args.samplers:  # NFE and the loop's own cost, with the free model (best of 3)
        for s in steps:
            ts = timesteps.make(args.spacing, s, sched)
            runs = []
            for _ in range(3):
                free = Free(eps)
                runs.append(timed(partial(sample, name, free, x_T, sched, ts), device)[0])
            nfe[name, s], loop[name, s] = free.calls, min(runs)

    runs = {(name, s): [] for name in args.samplers for s in args.steps}  # side_by_side's results, per repeat
    for r in range(args.repeats):
        for name in args.samplers:
            for s in args.steps:
                ts = timesteps.make(args.spacing, s, sched)
                runs[name, s].append(side_by_side(args, name, net, x_T, sched, ts, nfe[name, s], flip=r % 2 == 1))

    print(
        f"\n### Samplers: batch {args.batch}, {args.spacing} spacing; times: best of {args.repeats}; "
        f"{args.pairing} by {args.pairing} pairing\n"
    )
    print("| sampler | steps | NFE | s / image | bare forward, ms / image | overhead | outside calls | loop |")
    print("|---|---|---|---|---|---|---|---|")
    ratio = {}
    for name in args.samplers:
        for s in args.steps:
            (run, fwd), n = (min(v[i] for v in runs[name, s]) for i in (0, 1)), nfe[name, s]
            ratio[name, s] = statistics.median(r for v in runs[name, s] for r in v[2])
            outside = "—"
            if args.pairing == "call":  # the median call / twin ratio, plus the sampler's own time
                share = statistics.median(v[3] / v[1] for v in runs[name, s])
                ratio[name, s], outside = ratio[name, s] + share, f"{share:.4f}"
            print(
                f"| {name} | {s} | {n} | {run / args.batch:.3f} | {1e3 * fwd / args.batch / n:.1f} "
                f"| {ratio[name, s]:.3f} | {outside} | {loop[name, s] / fwd:.4f} |"
            )
    low, mid, high = min(ratio.values()), statistics.median(ratio.values()), max(ratio.values())
    print(f"\nOverhead over all settings: median {mid:.3f}, range {low:.3f} .. {high:.3f}.")
    overhead = {name: statistics.median(ratio[name, s] for s in args.steps) for name in args.samplers}
    if args.estimate_batch:
        estimate_table(args, net, device, nfe, overhead)


def estimate_table(args, net, device, nfe, overhead) -> None:
    """Table 2: seconds per image at another batch, from one bare forward there, the NFE and the overhead."""
    b, steps = args.estimate_batch, args.estimate_steps
    x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(device)
    bare(net, x, 1)  # warm-up at this batch
    fwd = min(timed(partial(bare, net, x, 1), device)[0] for _ in range(3))
    print(f"\n### Derived: s / image at batch {b} = NFE x {fwd:.3f} s (a bare forward, best of 3) / {b} x overhead\n")
    print("| sampler | overhead | " + " | ".join(f"{s} steps: NFE, s / image" for s in args.estimate_steps) + " |")
    print("|---|---|" + "---|" * len(args.estimate_steps))
    for name in args.samplers:
        cells = " | ".join(f"{nfe[name, s]}, {nfe[name, s] * fwd / b * overhead[name]:.2f}" for s in steps)
        print(f"| {name} | {overhead[name]:.3f} | {cells} |")


def deepcache_table(args, model, net, x_T, sched, device) -> None:
    """Table 3: each base sampler with and without DeepCache at N = args.intervals."""
    share, s = cached_cost(model, args.branch), args.cache_steps
    ts = timesteps.make(args.spacing, s, sched)
    caches = {n: DeepCache(model, ts, interval=n, branch=args.branch) for n in args.intervals}
    wrap = (lambda m: Autocast(m, PRECISIONS[args.precision])) if PRECISIONS[args.precision] else (lambda m: m)
    nets = {None: net, **{n: wrap(c) for n, c in caches.items()}}
    print(
        f"\n### DeepCache: {s} {args.spacing} steps, batch {args.batch}, branch {caches[args.intervals[0]].branch}, "
        f"uniform; a cached call costs {share:.3f} of a full one (MACs); best of {args.repeats}\n"
    )
    print("| sampler | N | full / cached calls | s / image | speed-up | MACs speed-up | mean abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cache_samplers:
        seconds, images, calls = {}, {}, {}
        for _ in range(args.repeats):  # interleaved, so that a noisy machine hurts every setting alike
            for n, m in nets.items():
                if n is not None:
                    caches[n].reset()
                    before = caches[n].full_calls, caches[n].shallow_calls
                sec, images[n] = timed(partial(sample, name, m, x_T, sched, ts), device)
                seconds[n] = min(sec, seconds.get(n, float("inf")))
                if n is not None:
                    calls[n] = caches[n].full_calls - before[0], caches[n].shallow_calls - before[1]
        nfe = sum(calls[args.intervals[0]])
        print(f"| {name} | no cache | {nfe} / 0 | {seconds[None] / args.batch:.3f} | 1.00x | 1.00x | 0 |")
        for n in args.intervals:
            full, cached = calls[n]
            diff, per_image = (images[n] - images[None]).abs().mean().item(), seconds[n] / args.batch
            print(
                f"| {name} | {n} | {full} / {cached} | {per_image:.3f} | {seconds[None] / seconds[n]:.2f}x "
                f"| {macs_speedup(share, full, full + cached):.2f}x | {diff:.4f} |"
            )


def profile(args, net, x_T, sched, device) -> None:
    """Where one run of `args.profile` at the first of --steps spends its time, by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    ts = timesteps.make(args.spacing, args.steps[0], sched)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        timed(lambda: sample(args.profile, net, x_T, sched, ts), device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### Profile: {args.profile}, {args.steps[0]} steps, batch {args.batch}\n")
    print(prof.key_averages().table(sort_by=key, row_limit=20))


# ---------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--spacing", choices=timesteps.NAMES, default="leading")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every setting (interleaved); keep the best")
    parser.add_argument(
        "--pairing",
        choices=["call", "run"],
        default=None,
        help="bare forwards timed beside each call (default on a "
        "CPU) or beside each whole run (default on a GPU, where timing each call would stall its queue)",
    )
    parser.add_argument("--estimate-batch", type=int, default=None, help="also derive s / image at this batch")
    parser.add_argument("--estimate-steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--cache-samplers", nargs="*", choices=SAMPLERS, default=["ddim", "pndm"], help="none: skip")
    parser.add_argument("--cache-steps", type=int, default=100, help="steps of the DeepCache runs (the paper: 100)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5], help="DeepCache's N")
    parser.add_argument("--branch", type=int, default=None, help="DeepCache branch; default: after the first level")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="autocast for the network")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", choices=SAMPLERS, default=None, help="only profile this sampler, then exit")
    args = parser.parse_args()
    for flag in ("batch", "repeats", "estimate_batch", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for s in [*args.steps, *args.estimate_steps, args.cache_steps]:
        if not 1 <= s <= T:
            parser.error(f"steps must lie in 1..{T} (the schedule's T), got {s}")
    if any(n < 1 for n in args.intervals):
        parser.error(f"--intervals must be >= 1 (1: a full step every step, i.e. no cache), got {args.intervals}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here; run on a GPU machine or use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.pairing = args.pairing or ("run" if device.type == "cuda" else "call")
    if args.pairing == "call" and device.type != "cpu":
        parser.error("--pairing call times each call on the host, which needs a CPU: use --pairing run on a GPU")

    model = jittered(UNet(**CIFAR10)).eval().to(device)
    try:
        DeepCache(model, branch=args.branch, interval=1)
    except ValueError as e:
        parser.error(f"--branch: {e}")
    net = Autocast(model, PRECISIONS[args.precision]) if PRECISIONS[args.precision] else model
    sched = schedule.linear(T=T)
    x_T = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    bare(net, x_T, 2)  # warm-up

    print(f"## Sampling speed, unet_cifar10 (35.7M parameters), {args.precision}, {device.type}: {machine(device)}")
    if args.profile:
        return profile(args, net, x_T, sched, device)
    sampler_table(args, net, x_T, sched, device)
    if args.cache_samplers:
        deepcache_table(args, model, net, x_T, sched, device)


if __name__ == "__main__":
    main()
