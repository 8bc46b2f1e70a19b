"""Where should `leading` start when T/3 < S < T, and what does a start short of pure noise cost? Measured on the
exact Gaussian mixture (benchmarks/mixture_testbed.py's, 3x8x8, 6 modes), T = 1000, linear and cosine schedules.

    python benchmarks/leading_spacing.py [--samples 1000] [--steps 300,400,500,700,999] [--common 10,20,50,100]

The old `leading` took k = T // S and stopped at (S-1) k: at S = 400 (k = 2) its first step was t = 798, although
every sampler starts from pure N(0, I). Candidates per S, each run with DDIM (eta = 0) and DDPM (posterior variance):

    old        0, k, ..., (S-1) k with k = T // S                                  (the old `leading`)
    shifted    the old one moved up by T-1 - (S-1) k so that it starts at T-1        (diffusers' steps_offset idea)
    ddim code  range(0, T, k): the DDIM code's loop; more than S steps when S does not divide T
    trailing   round(j T / S) - 1 for j = S .. 1                                    (Lin et al. 2024)
    floor      floor(i T / S): the DDIM paper's tau_i = floor(c i) with c = T / S     (now `leading`)

A second table runs every spacing at common step counts (DDIM and PNDM), and a third starts DDIM and DDPM at earlier
and earlier t0, then steps through every integer down to 0 (no discretisation error), to show what the missing
signal sqrt(alpha_bar[t0]) costs by itself. Cells: Frechet distance in data space / mode-weight error, and for the
deterministic samplers the share of samples that land on another mode than the same x_T under DDIM with all 1000
steps from T-1 (paired, so free of sampling noise). No clipping; the mixture's exact noise predictor; the same x_T
in every cell. Writes results/leading_spacing.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.mixture_testbed import RESULTS, image_mixture, noise_floor  # noqa: E402
from diffusion import (
    sampling,
    schedule,
    timesteps,  # noqa: E402
)
from diffusion.mixture import GaussianMixture  # noqa: E402
from diffusion.schedule import Schedule  # noqa: E402

SAMPLERS = {"ddim η=0": sampling.ddim, "ddpm (β̃)": sampling.ddpm}


def candidates(S: int, T: int) -> dict[str, Tensor]:
    """The spacings compared, each descending int64."""
    k, old = T // S, torch.arange(S - 1, -1, -1) * (T // S)
    return {
        "old": old,
        "shifted": old + T - 1 - (S - 1) * k,
        "ddim code": torch.arange(0, T, k).flip(0),
        "trailing": timesteps.trailing(S, T),
        "floor": timesteps.leading(S, T),
    }


def run(sampler, data: GaussianMixture, sched: Schedule, ts: Tensor, x_T: Tensor) -> Tensor:
    """Samples from x_T through `ts`. A start below T-1 is on purpose here: the schedule is cut at ts[0], which is
    how a sampler is told to start there (the visited alpha_bar are the same)."""
    cut = Schedule(sched.betas[: int(ts[0]) + 1], sched.name)
    return sampler(data.model(sched), x_T, cut, ts, generator=torch.Generator().manual_seed(1), clip=False)


def cell(data: GaussianMixture, out: Tensor, reference: Tensor | None) -> str:
    text = f"{data.frechet(out):.3f} / {data.mode_weight_error(out):.3f}"
    if reference is not None:
        flips = (data.nearest_mode(out) != data.nearest_mode(reference)).double().mean().item()
        text += f" · {100 * flips:.1f}%"
    return text


def spacing_table(data, sched, steps: Sequence[int], x_T: Tensor, reference: Tensor) -> list[str]:
    names = list(candidates(steps[0], sched.T))
    lines = [
        f"#### {sched.name} schedule, T={sched.T}",
        "",
        "| sampler | S | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, sampler in SAMPLERS.items():
        for S in steps:
            cells = []
            for ts in candidates(S, sched.T).values():
                out = run(sampler, data, sched, ts, x_T)
                first = sched.alphas_cumprod[ts[0]].sqrt().item()
                ref = reference if sampler is sampling.ddim else None
                cells.append(f"{cell(data, out, ref)} (t₀={int(ts[0])}, √ᾱ={first:.3f}, {len(ts)} steps)")
            lines.append(f"| {label} | {S} | " + " | ".join(cells) + " |")
    return lines


def start_table(data, sched, x_T: Tensor, reference: Tensor, targets: Sequence[float]) -> list[str]:
    root = sched.alphas_cumprod.sqrt()
    lines = [
        f"#### {sched.name} schedule: from t₀ down through every integer",
        "",
        "| √ᾱ(t₀) target | t₀ | √ᾱ(t₀) | DDIM η=0: Frechet / mode error · flips | DDPM (β̃): Frechet / mode error |",
        "|---|---|---|---|---|",
    ]
    for target in targets:
        t0 = int((root >= target).nonzero().max()) if target > root[-1] else sched.T - 1
        ts = torch.arange(t0, -1, -1)
        ddim = cell(data, run(sampling.ddim, data, sched, ts, x_T), reference)
        ddpm = cell(data, run(sampling.ddpm, data, sched, ts, x_T), None)
        lines.append(f"| {target:g} | {t0} | {root[t0].item():.4f} | {ddim} | {ddpm} |")
    return lines


def common_table(data, sched, counts: Sequence[int], x_T: Tensor, reference: Tensor) -> list[str]:
    lines = [
        f"#### {sched.name} schedule: every spacing at common step counts (flips against the same reference)",
        "",
        "| sampler | S | " + " | ".join(timesteps.NAMES) + " |",
        "|---|---|" + "---|" * len(timesteps.NAMES),
    ]
    for label, sampler in {"ddim η=0": sampling.ddim, "pndm": sampling.pndm}.items():
        for S in counts:
            cells = []
            for name in timesteps.NAMES:
                ts = timesteps.make(name, S, sched, check=False)  # the starts check_start refuses, measured too
                first = sched.alphas_cumprod[ts[0]].sqrt().item()
                out = run(sampler, data, sched, ts, x_T)
                cells.append(f"{cell(data, out, reference)} (t₀={int(ts[0])}, √ᾱ={first:.3f})")
            lines.append(f"| {label} | {S} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", default="300,400,500,700,999")
    parser.add_argument("--common", default="10,20,50,100")
    parser.add_argument("--starts", default="0,0.005,0.01,0.02,0.04,0.08,0.16,0.3")
    parser.add_argument("--out", default=str(RESULTS / "leading_spacing.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: threads only add synchronisation
    data = image_mixture()
    x_T = torch.randn((args.samples, *data.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (fd, fd_sd), (mwe, mwe_sd) = noise_floor(data, args.samples, 0)
    lines = [
        f"### Leading spacing for T/3 < S < T: {data}, {args.samples} samples, exact noise predictor, no clipping",
        "",
        "Cells: Frechet distance / mode-weight error · (DDIM and PNDM) share of samples on another mode than DDIM",
        "with all 1000 steps from T-1 from the same x_T. Noise floor (exact samples, mean ± sd over 5 draws): "
        f"{fd:.3f}±{fd_sd:.3f} / {mwe:.3f}±{mwe_sd:.3f}.",
        "",
    ]
    print("\n".join(lines), flush=True)
    steps, common, starts = (
        _numbers(text, kind) for text, kind in ((args.steps, int), (args.common, int), (args.starts, float))
    )
    for name in ("linear", "cosine"):
        shown = len(lines)
        sched = getattr(schedule, name)(1000)
        reference = run(sampling.ddim, data, sched, torch.arange(sched.T - 1, -1, -1), x_T)
        if steps:
            lines += spacing_table(data, sched, steps, x_T, reference) + [""]
        if common:
            lines += common_table(data, sched, common, x_T, reference) + [""]
        if starts:
            lines += start_table(data, sched, x_T, reference, starts) + [""]
        print("\n".join(lines[shown:]), flush=True)
    lines += [
        "PNDM from T-1 on the cosine schedule diverges without clipping (see sampling.pndm). What these numbers",
        "decided (leading = floor(i T / S), check_start's limits) is written up in diffusion/timesteps.py.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    return text


def _numbers(text: str, kind: type) -> list:
    """Comma-separated numbers; empty: skip that table."""
    return [kind(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    main()
