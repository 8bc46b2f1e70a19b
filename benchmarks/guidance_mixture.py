"""What guidance does, measured where the answer is known: the mixture of experiment=mixture with one class per mode.

    python benchmarks/guidance_mixture.py --checkpoint outputs/guidance/mixture-cond/checkpoints/last.ckpt \
        --guide outputs/guidance/mixture-cond/checkpoints/step_0001000.ckpt [--per-mode 300]

The checkpoint is `python train.py experiment=mixture conditional=true logger=csv trainer.max_steps=4000
callbacks.checkpoints.keep_every_n_steps=1000`; its step-1000 checkpoint is autoguidance's weaker guide (an earlier
checkpoint of the same model, as Karras et al. 2024 allow). Image i asks for mode i % 6, `--per-mode` images each,
from the same x_T in every cell; DPM-Solver++(2M) on log-SNR steps (and DDIM, UniPC, F-PNDM, DDPM, each on its
paper's spacing, for the exact model; F-PNDM's NFE are steps + 9).

Cells: share of samples nearest the requested mode's mean / per-mode Frechet distance to that mode's Gaussian
(averaged over the modes; the floor is that of as many exact samples) / spread: the samples' per-pixel std around
their own mean, over the mode's std (1: the data's). Rows: the exact conditional and unconditional predictors
(GaussianMixture.eps with labels), the trained network with classifier-free guidance, with a guidance interval, and
with autoguidance; columns: the scale w (Ho & Salimans's: 0 is the conditional model). Also the CPU cost of a guided
step against an unguided one. Writes results/guidance_mixture.md and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as a script: benchmarks.* from the repository root
import torch  # noqa: E402

from benchmarks.mixture_testbed import RESULTS, load_checkpoint  # noqa: E402
from benchmarks.objectives import Float64  # noqa: E402
from diffusion import sampling, timesteps  # noqa: E402
from diffusion.mixture import GaussianMixture  # noqa: E402
from diffusion.wrappers import prediction  # noqa: E402
from diffusion.wrappers.guidance import Guided  # noqa: E402

SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)
NFES = (10, 50)
INTERVAL = (0.28, 5.42)  # Kynkaenniemi et al. 2024's EDM2-S interval, in EDM's sigma
SAMPLERS = {"DPM-Solver++(2M)": (sampling.dpm_solver, "logsnr"), "DDIM": (sampling.ddim, "leading"),
            "UniPC-2": (sampling.unipc, "logsnr"), "F-PNDM": (sampling.pndm, "leading"),
            "DDPM": (sampling.ddpm, "linspace")}  # fmt: skip


def measure(model, labels, data: GaussianMixture, sched, sampler: str, nfe: int, x_T, batch: int) -> tuple:
    """(right-mode share, mean per-mode Frechet, mean spread ratio) of `model` (a Guided) from x_T."""
    fn, spacing = SAMPLERS[sampler]
    ts = timesteps.make(spacing, nfe, sched)
    out = []
    for x, y in zip(x_T.split(batch), labels.split(batch), strict=True):
        prediction.inner(model).condition(y)
        out.append(fn(model, x, sched, ts, generator=torch.Generator().manual_seed(len(out))))
    out = torch.cat(out)
    right = float((data.nearest_mode(out) == labels).double().mean())
    fds, spreads = [], []
    for k in range(len(data.means)):
        mode, mine = data.component(k), out[labels == k]
        fds.append(mode.frechet(mine))
        spreads.append(float((mine - mine.mean(0)).flatten(1).std()) / float(data.std[k]))
    return right, statistics.fmean(fds), statistics.fmean(spreads)


def floor(data: GaussianMixture, per_mode: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    return statistics.fmean(
        data.component(k).frechet(data.component(k).sample(per_mode, g)) for k in range(len(data.means))
    )


def cost(net, num_classes: int, sched, batch: int, repeats: int = 20) -> dict[str, float]:
    """Median seconds of one 50-step DDIM trajectory's network calls per step: unguided (the conditional model),
    guided (one batched forward of 2B), guided on the interval only; and the share of steps the interval guides."""
    x = torch.randn(batch, net.in_channels, net.resolution, net.resolution)
    y = torch.arange(batch) % num_classes
    ts = timesteps.make("leading", 50, sched).tolist()
    variants = {"unguided": Guided(net, num_classes), "guided": Guided(net, num_classes, scale=2.0),
                "interval": Guided(net, num_classes, scale=2.0, interval=INTERVAL, schedule=sched)}  # fmt: skip
    seconds = {}
    with torch.no_grad():
        for name, model in variants.items():
            model.condition(y)
            runs = []
            for _ in range(repeats // 5):
                start = time.perf_counter()
                for t in ts:
                    model(x, torch.full((batch,), t))
                runs.append((time.perf_counter() - start) / len(ts))
            seconds[name] = statistics.median(runs)
    sigma = [float(((1 - sched.alpha_bar(torch.tensor([t]))) / sched.alpha_bar(torch.tensor([t]))).sqrt()) for t in ts]
    seconds["interval_share"] = sum(INTERVAL[0] < s <= INTERVAL[1] for s in sigma) / len(ts)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--guide", required=True, help="autoguidance's weaker model: an earlier checkpoint")
    parser.add_argument("--per-mode", type=int, default=300)
    parser.add_argument("--batch", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--out", default=str(RESULTS / "guidance_mixture.md"))
    args = parser.parse_args(argv)
    scales, nfes = tuple(args.scales), tuple(args.nfe)
    torch.set_num_threads(1)

    net, sched, data, about = load_checkpoint(args.checkpoint, "cpu")
    guide_net, _, _, guide_about = load_checkpoint(args.guide, "cpu")
    unet = prediction.inner(net)  # an eps-network (experiment=mixture's target)
    net, guide_net = Float64(unet), Float64(prediction.inner(guide_net))
    K = len(data.means)
    n = K * args.per_mode
    labels = torch.arange(n) % K
    x_T = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    noise_floor = floor(data, args.per_mode, args.seed + 2)
    exact = data.conditional(sched)

    rows: dict[str, dict] = {}

    def row(name: str, sampler: str, make) -> None:
        rows[name] = {}
        for nfe in nfes:
            for w in scales:
                rows[name][nfe, w] = measure(make(w), labels, data, sched, sampler, nfe, x_T, args.batch)
            print(name, nfe, [rows[name][nfe, w] for w in scales], flush=True)

    for sampler in SAMPLERS:
        row(f"exact, CFG, {sampler}", sampler, lambda w: Guided(exact, K, scale=w))
    row("exact, CFG + interval, DPM-Solver++(2M)", "DPM-Solver++(2M)",
        lambda w: Guided(exact, K, scale=w, interval=INTERVAL, schedule=sched))  # fmt: skip
    row("exact, CFG + rescale 0.7, DPM-Solver++(2M)", "DPM-Solver++(2M)",
        lambda w: Guided(exact, K, scale=w, rescale=0.7))  # fmt: skip
    row("trained, CFG", "DPM-Solver++(2M)", lambda w: Guided(net, K, scale=w))
    row("trained, CFG + interval", "DPM-Solver++(2M)",
        lambda w: Guided(net, K, scale=w, interval=INTERVAL, schedule=sched))  # fmt: skip
    row(
        "trained, autoguidance (step-1000 guide)",
        "DPM-Solver++(2M)",
        lambda w: Guided(net, K, scale=w, guide=guide_net),
    )
    seconds = cost(unet, K, sched, batch=64)

    lines = ["# Guidance on the mixture: classifier-free guidance, its interval and rescale, autoguidance", "",
             f"`python benchmarks/guidance_mixture.py --checkpoint ... --guide ... --per-mode {args.per_mode}`: "
             f"{data} with one class per mode, {sched}; the trained network: {about}; the guide: {guide_about}. "
             f"Image i asks for mode i % {K}, {args.per_mode} per mode, the same x_T in every cell. Cells: share on "
             "the requested mode / mean per-mode Frechet distance / spread (sample std over the mode's). "
             f"Noise floor of {args.per_mode} exact samples per mode: Frechet {noise_floor:.3f}. Interval: EDM sigma "
             f"in ({INTERVAL[0]}, {INTERVAL[1]}].", ""]  # fmt: skip
    for nfe in nfes:
        lines += [f"#### {nfe} NFE (network calls per image; CFG's are 2B-row calls)", "",
                  "| model, guidance, sampler | " + " | ".join(f"w = {w:g}" for w in scales) + " |",
                  "|---|" + "---|" * len(scales)]  # fmt: skip
        for name, cells in rows.items():
            text = [f"{100 * r:.1f}% / {fd:.3f} / {s:.2f}" for r, fd, s in (cells[nfe, w] for w in scales)]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
        lines.append("")
    lines += ["#### Cost of a guided step (the trained UNet, batch 64, one CPU thread)", "",
              "| unguided | guided (one 2B forward) | guided on the interval only |", "|---|---|---|",
              f"| {1000 * seconds['unguided']:.1f} ms (1.00x) | {1000 * seconds['guided']:.1f} ms "
              f"({seconds['guided'] / seconds['unguided']:.2f}x) | {1000 * seconds['interval']:.1f} ms "
              f"({seconds['interval'] / seconds['unguided']:.2f}x; {100 * seconds['interval_share']:.0f}% of the 50 "
              "DDIM steps guided) |", ""]  # fmt: skip
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    plot(rows, noise_floor, Path(args.out).with_suffix(".png"), scales, nfes)


def plot(rows: dict, noise_floor: float, path: Path, scales: tuple, nfes: tuple) -> None:
    """Per-mode Frechet distance and spread against the scale, one line per row, one panel column per NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(nfes), figsize=(6 * len(nfes), 8), squeeze=False)
    for j, nfe in enumerate(nfes):
        for name, cells in rows.items():
            style = "--" if name.startswith("exact") else "-"
            for i in (0, 1):
                axes[i][j].plot(scales, [cells[nfe, w][i + 1] for w in scales], style, marker="o", label=name)
        axes[0][j].axhline(noise_floor, color="grey", lw=0.8)
        axes[0][j].set(title=f"{nfe} NFE", ylabel="per-mode Frechet distance", yscale="log")
        axes[1][j].set(xlabel="guidance scale w (0: conditional)", ylabel="spread (std over the mode's)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
