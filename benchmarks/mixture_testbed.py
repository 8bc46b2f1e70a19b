"""What the closed-form benchmarks share: the mixture of Gaussian images whose exact noise predictor is known, a
sampler configuration (`Row`) run on it from fixed x_T, and the measures of its samples (Frechet distance in data
space, mode-weight error, paired RMS and mode changes against twins from the same x_T, the noise floor of exact
samples), gathered over rows x NFE budgets by `table`; and `load_checkpoint`, a network trained on that mixture.

quality_vs_steps.py, consistency_mixture.py, analytic_dpm.py, leading_spacing.py and skip_tuning.py import it as
`benchmarks.mixture_testbed` (as scripts, they first put the repository root on sys.path, as for testbed.py).
"""

from __future__ import annotations

import os

# The closed form's matrices are small (192 x 192): BLAS threads only add synchronisation, up to 100x on a busy CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from diffusion import (
    sampling,
    timesteps,  # noqa: E402
)
from diffusion.errors import UsageError  # noqa: E402
from diffusion.mixture import GaussianMixture  # noqa: E402
from diffusion.sampling import analytic
from diffusion.schedule import Schedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR_DRAWS = 5
# The exact ODE endpoint of an x_T: PF (scipy's RK45) at rtol = atol = 1e-8, 9e-9 RMS per pixel from its 1e-10 run on
# the mixture; a 500-step DPM-Solver++(2M), the reference before PF, lands 1.7e-4 (linear) / 6.6e-5 (cosine) from it
# (it steps to clean data, PF stops at t = 0 and takes x0 there: benchmarks/README.md).
ENDPOINT_TOL = 1e-8
# NFE of S steps, as each sampler's docstring documents (the others: S); checked against counted calls in `run`
NFE = {"pndm": lambda S: 4 * S - 3 if S <= 3 else S + 9, "s_pndm": lambda S: S + 1 if S > 1 else 1,
       "fon": lambda S: 4 * (S - 1) + 1}  # fmt: skip
NFE["plms"] = NFE["s_pndm"]
AT_MOST = {"fon"}  # 4 (S - 1) + 1 meets few budgets: these take the most steps within the budget (their NFE said)


@dataclass(frozen=True)
class Row:
    """One sampler configuration: a table row. `wrap(model, timesteps) -> model` puts DeepCache or Skip-Tuning
    around the model (DESIGN principle 3: the sampler never knows)."""

    name: str
    sampler: Callable[..., Tensor]
    spacing: str = "leading"
    options: dict = field(default_factory=dict)
    wrap: Callable | None = None


def nfe_steps(row: Row, nfe: int) -> int | None:
    """The step count S at which `row` spends exactly `nfe` model evaluations (None if none does); for AT_MOST
    samplers the largest S within `nfe`."""
    count = NFE.get(row.sampler.__name__, lambda S: S)
    if row.sampler.__name__ in AT_MOST:
        return max((S for S in range(1, nfe + 1) if count(S) <= nfe), default=None)
    return next((S for S in range(1, nfe + 1) if count(S) == nfe), None)


def exact_endpoint(model, x_T: Tensor, sched: Schedule, *, batch: int | None = None, tol: float = ENDPOINT_TOL):
    """The probability-flow ODE's endpoint of each x_T under `model`: PF at rtol = atol = `tol`, from the log-SNR
    grid's start (lambda >= -5.1: t = 995 on the cosine schedule, where the logsnr rows start) to t = 0, then x0."""
    start = torch.tensor([timesteps.noisiest_usable(sched)], device=x_T.device)  # logsnr(1) would be T-1
    run = lambda x: sampling.pf(as_dtype(model), x, sched, start, rtol=tol, atol=tol)  # noqa: E731
    return torch.cat([run(x) for x in x_T.split(batch or len(x_T))])


class Refused(Exception):
    """A wrapper that cannot serve these steps (DeepCache's official rule finds no power): a blank cell, said why."""


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
    steps: int = 0
    full: float | None = None  # DeepCache's full UNet calls per sample run
    # (RMS difference per pixel, share of samples nearest another mode) against paired samples from the same x_T:
    # the exact ODE endpoint, or the exact predictor's samples with the same noise. Free of the floor's noise.
    paired: tuple[float, float] | None = None


def base_key(row: Row) -> tuple:
    """What identifies a row's sampler run apart from its wrapper: the key its exact counterpart is stored under."""
    return row.sampler.__name__, row.spacing, tuple(sorted(row.options.items()))


def takes_gamma(row: Row) -> bool:
    return "gamma" in inspect.signature(row.sampler).parameters or row.spacing in timesteps.GAMMA_SPACINGS


def as_dtype(model) -> Callable[[Tensor, Tensor], Tensor]:
    """`model` fed in its parameters' dtype (float64 arithmetic around a float32 network)."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    return model if not params else lambda x, t: model(x.to(params[0].dtype), t).to(x.dtype)


def run(row: Row, model, data: GaussianMixture, sched: Schedule, steps: int, x_T: Tensor, *, batch: int, seed: int,
        gamma: Tensor | None = None, data_var: float | None = None) -> tuple[Cell, Tensor]:  # fmt: skip
    """Sample from x_T [N, *shape] with `row`'s sampler (in batches): the measures against `data`, the samples."""
    ts = analytic.timesteps_for(row.spacing, steps, sched, gamma).to(x_T.device)
    net = row.wrap(model, ts) if row.wrap else model
    forward, calls = as_dtype(net), 0

    def counted(x: Tensor, t: Tensor) -> Tensor:  # the sampler's arithmetic stays in x_T's dtype (float64)
        nonlocal calls
        calls += 1
        return forward(x, t)

    g = torch.Generator(x_T.device).manual_seed(seed + 1)  # fresh noise of the stochastic samplers
    chunks = x_T.split(batch)
    analytic_options = {"gamma": gamma, "data_var": data_var}  # data_var: Theorem 2's bound (unclipped)
    takes = inspect.signature(row.sampler).parameters
    options = row.options | (analytic_options if "gamma" in takes else {})
    options |= {"clip": False} if "clip" in takes else {}  # the ODE solvers fon and pf never clip
    out = torch.cat([row.sampler(counted, x, sched, ts, generator=g, **options) for x in chunks])
    full = net.full_calls / len(chunks) if hasattr(net, "full_calls") else None
    cell = Cell(data.frechet(out), data.mode_weight_error(out), calls / len(chunks), steps, full)
    return cell, out


def noise_floor(data: GaussianMixture, n: int, seed: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, sd) of the Frechet distance and of the mode-weight error of n exact samples, over FLOOR_DRAWS draws."""
    g = torch.Generator().manual_seed(seed + 2)
    draws = [data.sample(n, generator=g) for _ in range(FLOOR_DRAWS)]
    fd = torch.tensor([data.frechet(x) for x in draws])
    mwe = torch.tensor([data.mode_weight_error(x) for x in draws])
    return (fd.mean().item(), fd.std().item()), (mwe.mean().item(), mwe.std().item())


def gamma_of(model, data: GaussianMixture, sched: Schedule, M: int, seed: int, device: str) -> tuple[Tensor, float]:
    """Analytic-DPM's Gamma of `model` by Monte Carlo over M exact samples of the mixture (its training data), and
    the data variance of the same samples (Theorem 2's bound: no sampler clips), as analytic_cache caches them."""
    x0 = data.sample(M, torch.Generator().manual_seed(seed + 10)).to(device)
    g = torch.Generator(device).manual_seed(seed + 11)
    big = not isinstance(model, torch.nn.Module)  # the closed form takes any batch; a network, a modest one
    gamma = analytic.estimate_gamma(as_dtype(model), x0, sched, batch_size=20000 if big else 512, generator=g)
    return gamma, analytic.data_variance(x0)


def table(rows: Sequence[Row], model, data: GaussianMixture, sched: Schedule, columns: Sequence[int], n: int, *,
          steps: Callable[[Row, int], int | None] = lambda row, c: c, seed: int = 0, batch: int | None = None,
          device: str = "cpu", keep: bool = False, exact: dict | None = None, endpoint: float = 0.0,
          gamma_m: int = 1000, reference: Tensor | None = None) -> dict:  # fmt: skip
    """Every row at every column: {"cells": {(row index, column): Cell}, "blank": {(row index, column): why},
    "floor", "seconds", "gamma_seconds", "reference"}, with "samples": {(base_key(row), steps): samples} if `keep`.

    Args:
        steps: the step count of a row in a column (default: the column itself), None for a blank cell.
        exact: the "samples" of the exact predictor's table: each cell is paired with its twin there.
        endpoint: if > 0, pair each cell with the ODE endpoint of `model` (`exact_endpoint`, PF at that tolerance).
        reference: that endpoint, as an earlier table on the same model, x_T and tolerance returned it (not rerun).
    """
    start = time.perf_counter()
    x_T = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_T = x_T.to(device)
    analytic_rows = any(map(takes_gamma, rows))
    gamma, data_var = gamma_of(model, data, sched, gamma_m, seed, device) if analytic_rows else (None, None)
    gamma_seconds = time.perf_counter() - start
    if endpoint and reference is None:
        reference = exact_endpoint(model, x_T, sched, batch=batch, tol=endpoint)
    reference = reference if endpoint else None
    cells, blank, samples = {}, {}, {}
    jobs = [(i, c) for i in range(len(rows)) for c in columns]
    for i, c in (bar := tqdm(jobs, desc="cells", unit="cell", leave=False)):
        bar.set_postfix_str(f"{rows[i].name} ({rows[i].spacing}), {c}")
        s = steps(rows[i], c)
        if s is None:
            blank[i, c] = "no step count spends exactly this many evaluations"
            continue
        try:
            cells[i, c], out = run(rows[i], model, data, sched, s, x_T, batch=batch or n, seed=seed, gamma=gamma,
                                   data_var=data_var)  # fmt: skip
        except Refused as why:  # said in the notes, not hidden
            blank[i, c] = str(why)
            continue
        key = (base_key(rows[i]), s)
        if keep and not rows[i].wrap:
            samples[key] = out
        twin = reference if reference is not None else (exact or {}).get(key)
        if twin is not None:
            cells[i, c].paired = paired(data, out, twin)
    seconds = time.perf_counter() - start
    result = {"cells": cells, "blank": blank, "floor": noise_floor(data, n, seed), "seconds": seconds,
              "gamma_seconds": gamma_seconds, "reference": reference}  # fmt: skip
    return result | ({"samples": samples} if keep else {})


def paired(data: GaussianMixture, samples: Tensor, exact: Tensor) -> tuple[float, float]:
    """(RMS difference per pixel, share of samples nearest another mode) between samples and their exact twins."""
    rms = (samples - exact).double().pow(2).mean().sqrt().item()
    return rms, (data.nearest_mode(samples) != data.nearest_mode(exact)).double().mean().item()


# ---------------------------------------------------------------- the trained model


def load_checkpoint(path: str, device: str) -> tuple[torch.nn.Module, Schedule, GaussianMixture, str]:
    """(EMA network, schedule, the mixture it was trained on, a description for the title) from a checkpoint of
    train.py with data=mixture."""
    from diffusion.io import checkpoints, registry

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
