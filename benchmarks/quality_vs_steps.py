"""Quality vs steps on a known distribution: every sampler's distance to the data at 10 / 20 / 50 / 100 steps.

    python benchmarks/quality_vs_steps.py [--schedule linear|cosine|both] [--steps 10,20,50,100] [--samples 10000]
    python benchmarks/quality_vs_steps.py --checkpoint outputs/.../last.ckpt [--device cuda] [--batch 1000]

The data is a mixture of Gaussian images (3x8x8 by default: 6 modes of random +-0.6 blocks, weights 1 : 2 : ... : 6,
std 0.1) whose optimal noise predictor is known in closed form (diffusion.mixture), so what separates a sampler's
output from the data is the sampler's own error: no training, no Inception network. Each cell is the Frechet
distance in data space to the mixture's mean and covariance, the mode-weight error (total variation between the
true weights and the share of samples nearest each mean) and the NFE. Every row starts from the same x_T (float64);
the noise floor is the same metrics on exact samples of the same size (mean +- sd over 5 draws): below it, a
difference between rows is sampling noise. Writes quality_<schedule>.md and quality_<schedule>.png to --out.

With --checkpoint, the model is a network trained by train.py on `data=mixture` (`experiment=mixture`): the table is
computed with it (and with DeepCache around it) and, for comparison, with the exact noise predictor of the same
mixture and schedule. Each trained cell is also paired with the exact predictor's samples from the same x_T and
noise: the RMS difference and the share of samples that land on another mode, the model's own error.
"""

from __future__ import annotations

import os

# The closed form's matrices are small (192 x 192): BLAS threads only add synchronisation, up to 100x on a busy CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from diffusion import samplers, schedule, timesteps  # noqa: E402
from diffusion.errors import UsageError  # noqa: E402
from diffusion.mixture import GaussianMixture  # noqa: E402
from diffusion.schedule import Schedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR_DRAWS = 5


@dataclass(frozen=True)
class Row:
    """One sampler configuration: a table row."""

    name: str
    sampler: Callable[..., Tensor]
    spacing: str = "leading"
    options: dict = field(default_factory=dict)
    cache: int = 0  # DeepCache interval N around a trained UNet (0: none)


ROWS = (
    Row("ddpm, σ²=β", samplers.ddpm, options={"variance": "beta"}),
    Row("ddim η=1 = ddpm, σ²=β̃", samplers.ddim, options={"eta": 1.0}),  # the same update (one shared step)
    Row("ddim η=0", samplers.ddim),
    Row("pndm (F-PNDM)", samplers.pndm),
    Row("s_pndm", samplers.s_pndm),
    Row("plms", samplers.plms),
    Row("dpm_solver++(2M)", samplers.dpm_solver, "logsnr"),
    Row("dpm_solver++(2M)", samplers.dpm_solver),
    Row("ddim η=0", samplers.ddim, "logsnr"),
)
DEEPCACHE_ROWS = tuple(Row(f"ddim η=0 + DeepCache N={n}", samplers.ddim, cache=n) for n in (2, 3, 5))


def image_mixture(image_size: int = 8, channels: int = 3, num_modes: int = 6, std: float = 0.1,
                  contrast: float = 0.6, seed: int = 0) -> GaussianMixture:  # fmt: skip
    """Modes of random +-contrast blocks of 2x2 pixels (48 signs each: means ~100 std apart), weights 1 : ... : K."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-image_size // 2)
    signs = torch.randint(0, 2, (num_modes, channels, blocks, blocks), generator=g) * 2 - 1
    means = signs.repeat_interleave(2, -1).repeat_interleave(2, -2)[..., :image_size, :image_size]
    return GaussianMixture(contrast * means.double(), torch.arange(1, num_modes + 1, dtype=torch.float64), std)


# ---------------------------------------------------------------- measuring


@dataclass
class Cell:
    frechet: float
    mode_error: float
    nfe: float
    full: float | None = None  # DeepCache's full UNet calls per sample run
    # Against the exact predictor's samples from the same x_T and noise (same sampler, no cache): RMS difference per
    # pixel and the share of samples that land nearest another mode. Paired, so free of the floor's sampling noise.
    paired: tuple[float, float] | None = None


def base_key(row: Row) -> tuple:
    """What identifies a row's sampler run apart from DeepCache: the key its exact counterpart is stored under."""
    return row.sampler.__name__, row.spacing, tuple(sorted(row.options.items()))


def run(row: Row, model, data: GaussianMixture, sched: Schedule, steps: int, x_T: Tensor, *, batch: int,
        seed: int, clip: bool) -> tuple[Cell, Tensor]:  # fmt: skip
    """Sample from x_T [N, *shape] with `row`'s sampler (in batches): the measures against `data`, the samples."""
    ts = timesteps.make(row.spacing, steps, sched).to(x_T.device)
    net = model
    if row.cache:
        from diffusion.deepcache import DeepCache

        net = DeepCache(model, ts, interval=row.cache)
    dtype = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else x_T.dtype
    calls = 0

    def counted(x: Tensor, t: Tensor) -> Tensor:  # the sampler's arithmetic stays in x_T's dtype (float64)
        nonlocal calls
        calls += 1
        return net(x.to(dtype), t).to(x.dtype)

    g = torch.Generator(x_T.device).manual_seed(seed + 1)  # fresh noise of the stochastic samplers
    chunks = x_T.split(batch)
    out = torch.cat([row.sampler(counted, x, sched, ts, generator=g, clip=clip, **row.options) for x in chunks])
    full = net.full_calls / len(chunks) if row.cache else None
    return Cell(data.frechet(out), data.mode_weight_error(out), calls / len(chunks), full), out


def noise_floor(data: GaussianMixture, n: int, seed: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, sd) of the Frechet distance and of the mode-weight error of n exact samples, over FLOOR_DRAWS draws."""
    g = torch.Generator().manual_seed(seed + 2)
    draws = [data.sample(n, generator=g) for _ in range(FLOOR_DRAWS)]
    fd = torch.tensor([data.frechet(x) for x in draws])
    mwe = torch.tensor([data.mode_weight_error(x) for x in draws])
    return (fd.mean().item(), fd.std().item()), (mwe.mean().item(), mwe.std().item())


def table(rows: Sequence[Row], model, data: GaussianMixture, sched: Schedule, steps: Sequence[int], n: int, *,
          seed: int = 0, batch: int | None = None, device: str = "cpu", clip: bool = True,
          keep: bool = False, exact: dict | None = None) -> dict:  # fmt: skip
    """Every row at every step count: {"cells": {(row index, steps): Cell}, "floor": ..., "seconds": ...}, with
    "samples": {(base_key(row), steps): samples} if `keep`. `exact`: the "samples" of the exact predictor's table,
    for the paired comparison."""
    start = time.perf_counter()
    x_T = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_T = x_T.to(device)
    cells, samples = {}, {}
    jobs = [(i, s) for i in range(len(rows)) for s in steps]
    for i, s in (bar := tqdm(jobs, desc="cells", unit="cell", leave=False)):
        bar.set_postfix_str(f"{rows[i].name} ({rows[i].spacing}), {s} steps")
        cells[i, s], out = run(rows[i], model, data, sched, s, x_T, batch=batch or n, seed=seed, clip=clip)
        key = (base_key(rows[i]), s)
        if keep and not rows[i].cache:
            samples[key] = out
        if exact is not None and key in exact:
            cells[i, s].paired = paired(data, out, exact[key])
    seconds = time.perf_counter() - start
    return {"cells": cells, "floor": noise_floor(data, n, seed), "seconds": seconds} | (
        {"samples": samples} if keep else {}
    )


def paired(data: GaussianMixture, samples: Tensor, exact: Tensor) -> tuple[float, float]:
    """(RMS difference per pixel, share of samples nearest another mode) between samples and their exact twins."""
    rms = (samples - exact).double().pow(2).mean().sqrt().item()
    return rms, (data.nearest_mode(samples) != data.nearest_mode(exact)).double().mean().item()


# ---------------------------------------------------------------- reporting


PAIRED_LEGEND = (
    "After the dot, against the exact noise predictor from the same x_T and noise (same sampler and steps, no",
    "DeepCache): RMS difference per pixel, and the share of samples that land nearest another mode than their",
    "exact twin. Paired, so these need no noise floor: they are the trained model's own error.",
)


def markdown(title: str, rows: Sequence[Row], steps: Sequence[int], result: dict) -> str:
    """The table: one row per sampler configuration, one column per step count, and the noise floor."""
    lines = [
        f"### {title}",
        "",
        "Cells: Frechet distance in data space / mode-weight error (total variation), NFE in brackets.",
        *(PAIRED_LEGEND if any(c.paired for c in result["cells"].values()) else ()),
        "",
        "| sampler | spacing | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for i, row in enumerate(rows):
        cells = []
        for s in steps:
            c = result["cells"][i, s]
            nfe = f"{c.nfe:g}" + (f", {c.full:g} full" if c.full is not None else "")
            vs_exact = f" · {c.paired[0]:.3f}, {100 * c.paired[1]:.1f}%" if c.paired else ""
            cells.append(f"{c.frechet:.3g} / {c.mode_error:.3f} ({nfe}){vs_exact}")
        lines.append(f"| {row.name} | {row.spacing} | " + " | ".join(cells) + " |")
    (fd, fd_sd), (mwe, mwe_sd) = result["floor"]
    floor = f"{fd:.3g}±{fd_sd:.2g} / {mwe:.3f}±{mwe_sd:.3f}"
    lines.append("| noise floor: exact samples | | " + " | ".join([floor] * len(steps)) + " |")
    lines += [
        "",
        f"Every row starts from the same x_T; the floor is the mean ± sd over {FLOOR_DRAWS} draws of exact samples.",
        "sample.py's ddpm (posterior variance β̃) is ddim η=1 exactly. Spacings: leading = 0, k, 2k, ... with",
        "k = T // steps (DDIM; never visits T-1), logsnr = uniform in log-SNR from T-1 (cosine: 996, below its",
        "clipped tail) to 0 (DPM-Solver).",
    ]
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, rows: Sequence[Row], steps: Sequence[int], result: dict) -> None:
    """Frechet distance and mode-weight error against NFE, log-log, with the noise floor as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, row in enumerate(rows):
        cells = [result["cells"][i, s] for s in steps]
        nfe = [c.nfe for c in cells]
        label = f"{row.name} ({row.spacing})"
        style = "-" if row.spacing == "leading" else "--"  # dashed: the spacing differs from the default
        kw = dict(marker="os^"[i // 10 % 3], markersize=4, linestyle=style, color=f"C{i % 10}", label=label)
        axes[0].plot(nfe, [c.frechet for c in cells], **kw)
        axes[1].plot(nfe, [c.mode_error for c in cells], **kw)
    names = ("Frechet distance (data space)", "mode-weight error")
    for ax, (mean, sd), name in zip(axes, result["floor"], names, strict=True):
        ax.axhspan(max(mean - sd, mean / 10), mean + sd, color="0.85", zorder=0)
        ax.axhline(mean, color="0.5", linewidth=1, zorder=0, label="noise floor (exact samples)")
        ax.set(xscale="log", yscale="log", xlabel="NFE (model evaluations)", ylabel=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the trained model


def load_checkpoint(path: str, device: str) -> tuple[torch.nn.Module, Schedule, GaussianMixture, str]:
    """(EMA network, schedule, the mixture it was trained on, a description for the title) from a checkpoint of
    train.py with data=mixture."""
    from diffusion import checkpoints, registry

    checkpoint = checkpoints.load(path)
    model, sched = checkpoints.load_model(checkpoint, device=device)
    data_cfg = checkpoint["config"].get("data")
    if not isinstance(data_cfg, dict):
        raise UsageError(f"{path}: its config has no data section, so the data distribution is unknown")
    datamodule = registry.build("data", data_cfg, where=f"{path}: checkpoint config data")
    target = data_cfg["_target_"]
    if not hasattr(datamodule, "distribution"):
        raise UsageError(f"{path} was trained on {target}, not a Gaussian mixture: train with data=mixture")
    data = datamodule.distribution()
    shape = (model.in_channels, model.resolution, model.resolution)
    if tuple(data.shape) != shape:
        raise UsageError(f"{path}: the model takes images of shape {shape}, its data config gives {data.shape}")
    params = sum(p.numel() for p in model.parameters())
    about = (
        f"{Path(path).name}: {type(model).__name__} of {params / 1e6:.2f}M parameters, EMA weights after "
        f"{checkpoint.get('global_step', '?')} training steps"
    )
    return model, sched.to("cpu"), data, about


# ---------------------------------------------------------------- the script


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--schedule",
        choices=("linear", "cosine", "both"),
        default=None,
        help="the closed form's schedule(s), T=1000 (default: both; a checkpoint brings its own)",
    )
    parser.add_argument("--steps", default="10,20,50,100", help="comma-separated step counts")
    parser.add_argument("--samples", type=int, default=10000, help="samples per cell (and for the noise floor)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the .md tables and .png plots")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a train.py checkpoint trained with data=mixture")
    parser.add_argument("--batch", type=int, default=None, help="samples per sampler call (default: all at once)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the closed form, whose small ops lose to threading)",
    )
    parser.add_argument("--no-clip", dest="clip", action="store_false", help="do not clip x0 to [-1, 1]")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write the tables only")
    args = parser.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps must be comma-separated integers such as 10,20,50,100, got {args.steps!r}")
    if any(s < 1 for s in args.steps) or args.samples < 2 or (args.batch is not None and args.batch < 1):
        parser.error("need --steps >= 1 each, --samples >= 2 and --batch >= 1")
    if args.checkpoint and args.schedule:
        parser.error("--schedule applies to the closed form only: a checkpoint brings the schedule it was trained on")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    """Run the benchmark; print and write the tables (and plots). Returns {name: result of `table`}."""
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads or not args.checkpoint:
        torch.set_num_threads(args.threads or 1)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict[str, dict]:
    out, results = Path(args.out), {}
    opts = dict(seed=args.seed, batch=args.batch, device=args.device, clip=args.clip)
    jobs = []  # (file name, title, rows, model, data, schedule)
    if args.checkpoint:
        model, sched, data, about = load_checkpoint(args.checkpoint, args.device)
        where = f"{sched.name} schedule, T={sched.T}, {data}, {args.samples} samples"
        jobs.append((f"quality_checkpoint_{sched.name}_exact", f"Exact noise predictor ({where})",
                     ROWS, data.model(sched), data, sched))  # fmt: skip
        jobs.append((f"quality_checkpoint_{sched.name}", f"Trained model {about} ({where})",
                     ROWS + DEEPCACHE_ROWS, model, data, sched))  # fmt: skip
    else:
        data = image_mixture(seed=args.seed)
        for name in ("linear", "cosine") if args.schedule in (None, "both") else (args.schedule,):
            sched = getattr(schedule, name)(T=1000)
            title = f"Exact noise predictor, {name} schedule (T=1000), {data}, {args.samples} samples"
            jobs.append((f"quality_{name}", title, ROWS, data.model(sched), data, sched))
    # With a checkpoint, the exact table runs first and keeps its samples for the trained table's paired columns.
    exact = None
    for file, title, rows, model, data, sched in jobs:
        if max(args.steps) > sched.T:
            raise UsageError(f"--steps {max(args.steps)} exceeds the schedule's T={sched.T}")
        keep = bool(args.checkpoint) and exact is None
        result = table(rows, model, data, sched, args.steps, args.samples, keep=keep, exact=exact, **opts)
        exact = result.pop("samples", exact)  # large: not returned
        text = markdown(title, rows, args.steps, result)
        print(text + f"\n({result['seconds']:.0f} s)\n", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{file}.md").write_text(text)
        if args.plot:
            plot(out / f"{file}.png", title, rows, args.steps, result)
        results[file] = result
    return results


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
