"""Skip-Tuning (Ma et al. 2024) on the trained mixture UNet: a rho sweep for few-step ODE samplers; the plain speed.

    python benchmarks/skip_tuning.py --checkpoint /work/ckpts/mixture_linear/checkpoints/last.ckpt [--samples 256]
    python benchmarks/skip_tuning.py --speed-only

The network is a train.py checkpoint on `data=mixture` (benchmarks/mixture_testbed.py loads it), whose data has a
closed-form noise predictor. Every cell starts from the same x_T and reports, against the exact probability-flow
ODE's endpoint from that x_T (the exact predictor under DPM-Solver++(2M) with --reference-steps log-SNR steps):

    RMS      per-pixel RMS distance to the endpoint: sampler error + model error, paired, so free of sampling noise;
    off      the share of samples that land nearest another mode than their endpoint;
    spread   E ||x - nearest mean||^2 / (D std^2): 1 for exact samples (the floor row), below 1 over-smoothed,
             above 1 noisy: the blur that FID punishes and Skip-Tuning is said to remove.

The Frechet distance of quality_vs_steps.py is left out: with a few hundred samples in D = 768 dimensions its
covariance estimate swamps any difference between columns. The first column is the exact predictor under the
same sampler and steps (the sampler's own error); the others the network with Skip-Tuning (rho_top:rho_bottom;
1:1 is the plain network). No sampler clips x0 (the data is unbounded) unless --clip: an undertrained network's
few-step samples can run far off without it (the endpoint is never clipped).

--speed-only (also run after the sweep): one forward of the plain UNet before and after UNet.up_level took `rho`
(the module as of commit BEFORE, from git), interleaved, and of SkipTuning around it; the median per-round ratio
of process CPU times (wall time on a shared machine measures the neighbours).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root
from benchmarks.mixture_testbed import load_checkpoint  # noqa: E402
from diffusion import (
    sampling,
    timesteps,  # noqa: E402
)
from diffusion.mixture import GaussianMixture  # noqa: E402
from diffusion.unet import UNet  # noqa: E402
from diffusion.wrappers.skiptuning import SkipTuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEFORE = "c6f7a5c~1"  # the last commit whose UNet.up_level had no rho
# (name, sampler, spacing, {target NFE: steps}): F-PNDM's NFE is S + 9 (4S - 3 for S <= 3), so 5 / 9 / 20
SAMPLERS = (
    ("ddim η=0", sampling.ddim, "leading", {5: 5, 10: 10, 20: 20}),
    ("dpm_solver++(2M)", sampling.dpm_solver, "logsnr", {5: 5, 10: 10, 20: 20}),
    ("pndm (F-PNDM)", sampling.pndm, "leading", {5: 2, 10: 3, 20: 11}),
)
RHOS = "1:1,1:0.9,1:0.8,1:0.7,1:0.6,0.8:0.8"


# ---------------------------------------------------------------- the sweep


def solve(model: Callable, sampler: Callable, sched, ts: Tensor, x_T: Tensor, dtype: torch.dtype,
          clip: bool = False) -> tuple[Tensor, int]:  # fmt: skip
    """x0 from x_T (float64 arithmetic, the model in `dtype`) and the number of model calls."""
    calls = 0

    def counted(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return model(x.to(dtype), t).to(x.dtype)

    with torch.no_grad():
        return sampler(counted, x_T, sched, ts, clip=clip), calls


def measures(data: GaussianMixture, x: Tensor, endpoint: Tensor) -> tuple[float, float, float]:
    """(RMS to the endpoint, share off the endpoint's mode, spread) of samples x [N, *shape]."""
    k = data.nearest_mode(x)
    flat, mu = x.reshape(len(x), -1).double(), data.means.reshape(len(data.means), -1)[k]
    spread = (((flat - mu) ** 2).mean(1) / data.std[k] ** 2).mean().item()
    rms = (x - endpoint).double().pow(2).mean().sqrt().item()
    return rms, (k != data.nearest_mode(endpoint)).double().mean().item(), spread


def floor(data: GaussianMixture, n: int, draws: int = 5) -> tuple[float, float]:
    """Mean and sd of the spread of n exact samples over `draws` draws."""
    g = torch.Generator().manual_seed(1)
    values = []
    for _ in range(draws):
        x = data.sample(n, generator=g)
        values.append(measures(data, x, x)[2])
    return statistics.mean(values), statistics.stdev(values)


def sweep(model: UNet, sched, data: GaussianMixture, rhos: list[tuple[float, float]], n: int, ref_steps: int,
          seed: int, clip: bool = False) -> dict:  # fmt: skip
    """{(sampler name, nfe target, column): (measures, nfe)}; column "exact" or (rho_top, rho_bottom)."""
    x_T = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = data.model(sched)
    endpoint, _ = solve(exact, sampling.dpm_solver, sched, timesteps.make("logsnr", ref_steps, sched), x_T,
                        torch.float64)  # fmt: skip
    dtype, cells = next(model.parameters()).dtype, {}
    for name, sampler, spacing, nfes in SAMPLERS:
        for target, steps in nfes.items():
            ts = timesteps.make(spacing, steps, sched)
            out, calls = solve(exact, sampler, sched, ts, x_T, torch.float64, clip)
            cells[name, target, "exact"] = measures(data, out, endpoint), calls
            for top, bottom in rhos:
                start = time.perf_counter()
                net = SkipTuning(model, rho_top=top, rho_bottom=bottom)
                out, calls = solve(net, sampler, sched, ts, x_T, dtype, clip)
                cells[name, target, (top, bottom)] = measures(data, out, endpoint), calls
                m = cells[name, target, (top, bottom)][0]
                print(f"{name} {target} NFE rho {top}:{bottom}: RMS {m[0]:.4f} off {m[1]:.3f} spread {m[2]:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return cells


def sweep_markdown(title: str, cells: dict, rhos: list[tuple[float, float]], spread_floor: tuple[float, float],
                   n: int, ref_steps: int) -> str:  # fmt: skip
    columns = ["exact", *rhos]
    head = ["exact predictor", *(f"ρ {t:g}:{b:g}" + (" (plain)" if t == b == 1 else "") for t, b in rhos)]
    lines = [f"### {title}", "",
             f"Cells: RMS to the exact ODE endpoint · off-mode share · spread (1 = exact samples), {n} samples from",
             f"the same x_T; endpoint: exact predictor, DPM-Solver++(2M), {ref_steps} log-SNR steps. Bold: the",
             "network column with the smallest RMS in its row.", "",
             "| sampler | NFE | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]  # fmt: skip
    for name, _, _, nfes in SAMPLERS:
        for target in nfes:
            row = {c: cells[name, target, c] for c in columns}
            best = min(rhos, key=lambda c: row[c][0][0])
            texts = []
            for c in columns:
                (rms, off, spread), _ = row[c]
                text = f"{rms:.4f} · {100 * off:.1f}% · {spread:.2f}"
                texts.append(f"**{text}**" if c == best else text)
            lines.append(f"| {name} | {row['exact'][1]} | " + " | ".join(texts) + " |")
    mean, sd = spread_floor
    lines += ["", f"Spread of exact samples ({n} per draw, 5 draws): {mean:.3f} ± {sd:.3f}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the plain UNet's speed


def unet_before() -> type:
    """UNet as of commit BEFORE (git show), imported from a temporary file: the reference for the speed ratio."""
    source = subprocess.run(["git", "show", f"{BEFORE}:diffusion/unet.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "unet_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("unet_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UNet


def speed(rounds: int) -> str:
    """Per-round ratios of forward times, after / before and Skip-Tuned / plain, interleaved in rotating order."""
    old_unet = unet_before()
    configs = [
        ("unet_tiny (mixture), batch 64, 16x16", dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
         attn_resolutions=(16,), dropout=0.0, resolution=16, norm_groups=8), 64, 16),
        ("CIFAR-10 DDPM UNet (35.7M), batch 2, 32x32", dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
         attn_resolutions=(16,), dropout=0.1, resolution=32), 2, 32),
    ]  # fmt: skip
    lines = ["### The plain UNet's forward, before and after `up_level` took `rho`", "",
             f"{torch.get_num_threads()} CPU thread(s), process CPU time (a shared, loaded machine); {rounds} rounds, "
             "each timing every model once in rotating order. Ratios: median over rounds [quartiles].", "",
             "| model | before (CPU ms) | after (CPU ms) | after / before | Skip-Tuned 1:0.8 / after | same output |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, kwargs, batch, size in configs:
        new = UNet(**kwargs).eval()
        old = old_unet(**kwargs).eval()
        old.load_state_dict(new.state_dict())
        tuned = SkipTuning(new, rho_top=1.0, rho_bottom=0.8)
        x, t = torch.randn(batch, 3, size, size), torch.full((batch,), 500)
        models = {"before": old, "after": new, "tuned": tuned}
        times = {k: [] for k in models}
        with torch.inference_mode():
            same = torch.equal(old(x, t), new(x, t))
            for r in range(rounds + 1):
                names = list(models)[r % 3 :] + list(models)[: r % 3]
                for k in names:
                    start = time.process_time()  # CPU time: a loaded machine's preemption does not count
                    models[k](x, t)
                    if r:  # round 0 warms up
                        times[k].append(time.process_time() - start)
        after = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
        tuned_ratio = [a / b for a, b in zip(times["tuned"], times["after"], strict=True)]

        def ratio(values: Sequence[float]) -> str:
            q = statistics.quantiles(values, n=4)
            return f"{statistics.median(values):.3f} [{q[0]:.3f}, {q[2]:.3f}]"

        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        lines.append(f"| {label} | {ms['before']:.1f} | {ms['after']:.1f} | {ratio(after)} | {ratio(tuned_ratio)} | "
                     f"{'bit for bit' if same else 'DIFFERENT'} |")  # fmt: skip
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the script


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a train.py checkpoint trained with data=mixture")
    parser.add_argument("--samples", type=int, default=256, help="samples per cell (the same x_T for every cell)")
    parser.add_argument("--rhos", default=RHOS, help="comma-separated rho_top:rho_bottom pairs; 1:1 is the plain net")
    parser.add_argument("--reference-steps", type=int, default=200, help="log-SNR steps of the exact ODE endpoint")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds of the speed comparison")
    parser.add_argument("--speed-only", action="store_true", help="only the plain UNet's speed, before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip", action="store_true", help="clip x0 to [-1, 1] in every sampler (default: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: small ops lose to threading)")
    parser.add_argument("--out", default=str(RESULTS / "skip_tuning.md"))
    args = parser.parse_args(argv)
    try:
        rhos = [tuple(float(v) for v in pair.split(":")) for pair in args.rhos.split(",")]
        assert all(len(pair) == 2 for pair in rhos)
    except (ValueError, AssertionError):
        parser.error(f"--rhos takes pairs rho_top:rho_bottom such as 1:0.8,0.9:0.7, got {args.rhos!r}")
    if not args.speed_only and not args.checkpoint:
        parser.error("give --checkpoint (a data=mixture run's last.ckpt), or --speed-only")
    if args.samples < 2 or args.rounds < 2:
        parser.error("need --samples >= 2 and --rounds >= 2")
    torch.set_num_threads(args.threads)
    parts = []
    if not args.speed_only:
        model, sched, data, about = load_checkpoint(args.checkpoint, "cpu")
        start = time.perf_counter()
        cells = sweep(model, sched, data, rhos, args.samples, args.reference_steps, args.seed, args.clip)
        clipped = "x0 clipped to [-1, 1]" if args.clip else "no clipping"
        title = f"Skip-Tuning on {about} ({sched.name} schedule, {data}, {clipped})"
        parts.append(sweep_markdown(title, cells, rhos, floor(data, args.samples), args.samples,
                                    args.reference_steps))  # fmt: skip
        parts[-1] += f"\n({time.perf_counter() - start:.0f} s)\n"
    parts.append(speed(args.rounds))
    text = "\n".join(parts)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
