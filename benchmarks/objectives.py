"""What the network predicts and how the loss weighs it, measured where the answer is known: the mixture network of
experiment=mixture trained with eps / x0 / v x uniform / min-SNR (Hang et al. 2023, gamma = 5) for the same steps
and seed, its EMA weights sampled by DPM-Solver++(2M) on log-SNR steps at 10 and 50 NFE from the same x_T, against
the exact mixture and the exact ODE endpoint of each x_T.

    python benchmarks/objectives.py [--steps 4000] [--every 1000] [--samples 1000] [--runs outputs/objectives]

Training runs (train.py, logged to CSV) go to --runs/<target>-<weighting>/ and are reused when their last.ckpt is
there. Cells: Frechet distance to the mixture / paired RMS per pixel to the exact ODE endpoint (PF at rtol = atol =
1e-8 under the exact predictor from the same x_T) / share of samples on another mode than that endpoint.
Writes results/objectives_mixture.md and .png. On a GPU, the CIFAR-10 comparison is the same six runs of
`python train.py data=cifar10 module.prediction=P module.loss_weight=W` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as a script: benchmarks.* from the repository root
import torch  # noqa: E402

from benchmarks.mixture_testbed import RESULTS, exact_endpoint, load_checkpoint, paired  # noqa: E402
from diffusion import sampling, timesteps  # noqa: E402
from diffusion.wrappers import prediction  # noqa: E402

TARGETS, WEIGHTINGS, NFES = ("eps", "x0", "v"), ("uniform", "min_snr"), (10, 50)


class Float64(torch.nn.Module):
    """A float32 network fed and read in float64, so that the sampler's arithmetic is float64 (a conditional
    network's labels y passed on)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), t, *y).double()


def train_run(folder: Path, target: str, weighting: str, steps: int, every: int, seed: int) -> None:
    """train.py experiment=mixture with this objective, keeping a checkpoint every `every` steps (skipped if done)."""
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return
    command = [sys.executable, "train.py", "experiment=mixture", "logger=csv", f"module.prediction={target}",
               f"module.loss_weight={weighting}", f"trainer.max_steps={steps}", f"seed={seed}",
               f"callbacks.checkpoints.keep_every_n_steps={every}", "trainer.enable_progress_bar=false",
               f"hydra.run.dir={folder}"]  # fmt: skip
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


@torch.no_grad()
def measure(path: Path, x_T: torch.Tensor, endpoint: dict, batch: int) -> dict[int, tuple[float, float, float]]:
    """NFE -> (Frechet, paired RMS, mode flips) of the checkpoint's EMA network from x_T."""
    net, sched, data, _ = load_checkpoint(str(path), "cpu")
    net = prediction.around(net, Float64(prediction.inner(net)))  # the wrapper (an x0- or v-network) kept outermost
    cells = {}
    for nfe in NFES:
        ts = timesteps.logsnr(nfe, sched)
        out = torch.cat([sampling.dpm_solver(net, x, sched, ts) for x in x_T.split(batch)])
        rms, flips = paired(data, out, endpoint[sched.name])
        cells[nfe] = (data.frechet(out), rms, flips)
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "objectives"))
    parser.add_argument("--out", default=str(RESULTS / "objectives_mixture.md"))
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    for target in TARGETS:
        for weighting in WEIGHTINGS:
            train_run(runs / f"{target}-{weighting}", target, weighting, args.steps, args.every, args.seed)

    _, sched, data, _ = load_checkpoint(str(runs / "eps-uniform" / "checkpoints" / "last.ckpt"), "cpu")
    x_T = torch.randn(
        (args.samples, *data.shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
    )
    exact = exact_endpoint(data.model(sched), x_T, sched)
    endpoint = {sched.name: exact}
    floor = data.frechet(data.sample(args.samples, torch.Generator().manual_seed(args.seed + 2)))
    checkpoints = range(args.every, args.steps + 1, args.every)
    table = {}
    for target in TARGETS:
        for weighting in WEIGHTINGS:
            folder = runs / f"{target}-{weighting}" / "checkpoints"
            for step in checkpoints:
                path = folder / f"step_{step:07d}.ckpt"
                table[target, weighting, step] = measure(path, x_T, endpoint, args.batch)
                print(target, weighting, step, table[target, weighting, step], flush=True)

    lines = ["# Prediction targets and loss weightings on the mixture", "",
             f"`python benchmarks/objectives.py --steps {args.steps} --every {args.every} --samples {args.samples}`: "
             f"experiment=mixture (the 0.40M-parameter UNet, {sched}, {data}) trained with each objective for "
             f"{args.steps} steps (seed {args.seed}), EMA weights, DPM-Solver++(2M) on log-SNR steps. Cells: Frechet "
             "distance / paired RMS per pixel to the exact ODE endpoint / share of samples on another mode than it. "
             f"Noise floor of {args.samples} exact samples: Frechet {floor:.3f}.", ""]  # fmt: skip
    for nfe in NFES:
        head = "| target | weighting | " + " | ".join(f"step {s}" for s in checkpoints) + " |"
        lines += [f"#### {nfe} NFE", "", head, "|---|---|" + "---|" * len(checkpoints)]
        for target in TARGETS:
            for weighting in WEIGHTINGS:
                cells = [table[target, weighting, s][nfe] for s in checkpoints]
                text = [f"{fd:.3f} / {rms:.3f} / {100 * flips:.1f}%" for fd, rms, flips in cells]
                lines.append(f"| {target} | {weighting} | " + " | ".join(text) + " |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    plot(table, checkpoints, Path(args.out).with_suffix(".png"))


def plot(table: dict, checkpoints: range, path: Path) -> None:
    """Frechet distance and paired RMS against training steps, one line per objective, one panel per NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(NFES), figsize=(5 * len(NFES), 7), squeeze=False)
    for j, nfe in enumerate(NFES):
        for target in TARGETS:
            for weighting in WEIGHTINGS:
                cells = [table[target, weighting, s][nfe] for s in checkpoints]
                style = "-" if weighting == "uniform" else "--"
                for i in (0, 1):
                    axes[i][j].plot(list(checkpoints), [c[i] for c in cells], style, marker="o",
                                    label=f"{target}, {weighting}")  # fmt: skip
        axes[0][j].set(title=f"{nfe} NFE", ylabel="Frechet distance", yscale="log")
        axes[1][j].set(xlabel="training steps", ylabel="paired RMS to the exact ODE endpoint")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
