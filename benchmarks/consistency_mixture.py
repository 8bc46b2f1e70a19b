"""Consistency models against the exact ODE on a known distribution: CD, CT and PCM students at 1, 2 and 4 steps
next to DDIM, DPM-Solver++ and PNDM at 10 to 100 NFE.

    python benchmarks/consistency_mixture.py [--iterations N] [--samples 5000] [--out benchmarks/results]

The data is mixture_testbed.py's mixture of Gaussian images (3x8x8, 6 modes) on the linear schedule (T = 1000),
whose exact noise predictor is the CD teacher: no teacher error, so what separates a student from the exact
consistency function (the probability-flow ODE's solution map) is the distillation's own error. The exact ODE
endpoint of each x_T is a PF run (adaptive RK45 at rtol = atol = 1e-8: mixture_testbed.exact_endpoint; the committed
results were made against a 500-step DPM-Solver++(2M) run, 1.7e-4 RMS per pixel from it). Measures: the paired RMS
distance per pixel to that endpoint from the same x_T, the share of samples on another mode than the endpoint's, the
Frechet distance to the data (the noise floor: exact samples of the same size), and NFE. Writes
consistency_mixture.{md,png,json}; the .json is what quality_vs_steps.py reads to put these rows in its table.

Students: a residual MLP with scale-shift time conditioning under Karras et al.'s preconditioning (`Student`), all
from scratch (`train(from_teacher=True)` starts CD as its teacher, as Song et al. 2023 do: see STUDENTS for why
not here); each trains for its own number of Adam steps (STUDENTS; --iterations sets one for all). An MLP, not a
UNet: 8x8 images need no convolutions, and it trains in minutes on a CPU. We sample from the EMA of the weights and
choose the 2- and 4-step intermediate times on held-out seeds, as Song et al. do.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root
from benchmarks import mixture_testbed as mt  # noqa: E402
from diffusion import (
    sampling,
    schedule,
    timesteps,  # noqa: E402
)
from diffusion.sampling import consistency as cm  # noqa: E402
from diffusion.training import losses  # noqa: E402
from diffusion.training.module import ema_update  # noqa: E402

SIGMA_DATA = 0.5  # Karras et al.'s sigma_data: the mixture's per-pixel std is 0.53 (means +-0.6, spread 0.1)
BASELINES = (
    mt.Row("ddim η=0", sampling.ddim),
    mt.Row("dpm_solver++(2M)", sampling.dpm_solver, "logsnr"),
    mt.Row("pndm (F-PNDM)", sampling.pndm),
)


class MLP(nn.Module):
    """F for flattened images [B, C, H, W] -> [B, C, H, W]: a residual MLP whose blocks take the time embedding as a
    scale and shift of their normalised input (Nichol & Dhariwal 2021's scale-shift norm, as in the UNet's res blocks):
    the consistency function multiplies x by factors that move with t, which an embedding added once at the input
    learns slowly. The output layer starts at zero (`zero`)."""

    def __init__(self, shape: tuple[int, ...], width: int = 512, zero: bool = True, blocks: int = 3) -> None:
        super().__init__()
        dim = math.prod(shape)
        self.shape = shape
        self.embed = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(width, elementwise_affine=False),
                                                   "film": nn.Linear(width, 2 * width), "out": nn.Linear(width, width)})
                                    for _ in range(blocks))  # fmt: skip
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        if zero:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        freqs = torch.exp(-math.log(1e4) * torch.arange(32, device=x.device) / 32)
        times, index = torch.unique(t, return_inverse=True)  # a batch holds few distinct t: embed each once
        angle = (times.float() + 1)[:, None] * freqs
        emb = nn.functional.silu(self.embed(torch.cat([angle.sin(), angle.cos()], 1)))
        h = self.inp(x.flatten(1).float())
        for block in self.blocks:
            scale, shift = block["film"](emb)[index].chunk(2, 1)
            h = h + block["out"](nn.functional.silu(block["norm"](h) * (1 + scale) + shift))
        return self.out(h).reshape(x.shape).to(x.dtype)


class Student(nn.Module):
    """eps-model around an MLP F with Karras et al. 2022's preconditioning in the VE noise level s = sigma / alpha
    (Song et al. 2023 sec. 3): x0 = c_skip x / alpha + c_out F(c_in x / alpha, t), c_skip = d^2 / (s^2 + d^2),
    c_out = s d / sqrt(s^2 + d^2), c_in = 1 / sqrt(s^2 + d^2), d = sigma_data; for CD the skip term is the exact
    teacher's x0 instead (F starts at zero: the student starts as its teacher). eps = (x - alpha x0) / sigma.
    An MLP that output x0 alone (c_skip = 0) had to copy x at low noise and let CT collapse; one that output eps
    would need 156x the precision at t = T-1 (x0 = (x - sigma eps) / alpha)."""

    def __init__(self, residual: MLP, sched, teacher=None, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.residual, self.teacher, self.sigma_data = residual, teacher, sigma_data
        self.register_buffer("abar", sched.alphas_cumprod.float(), persistent=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        abar = self.abar[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        alpha, sigma, d = abar.sqrt(), (1 - abar).sqrt(), self.sigma_data
        s = sigma / alpha
        norm = (s**2 + d**2).sqrt()
        F = self.residual(x / alpha / norm, t)
        skip = d**2 / norm**2 * x / alpha if self.teacher is None else (x - sigma * self.teacher(x, t)) / alpha
        x0 = skip + s * d / norm * F
        return (x - alpha * x0) / sigma


def train(kind: str, data, sched, iterations: int, *, batch: int = 256, lr: float = 1e-3, N: int = 18,
          k: int = 1, mu: float = 0.95, phases: int = 1, solver: str = "dpm_solver", grid: str = "karras",
          weighting: bool = False, ema: float = 0.999, width: int = 512, from_teacher: bool = True, seed: int = 0,
          log=print) -> tuple[Student, float]:  # fmt: skip
    """A CD, CT or PCM student after `iterations` Adam steps, the learning rate decaying to 0 on a cosine; returns the
    EMA of its weights (rate `ema`, warmed up as min(ema, (1 + i) / (10 + i)): Song et al. sample from an EMA, apart
    from the target network's mu) and the training wall time (s)."""
    torch.manual_seed(seed)
    teacher = data.model(sched)
    warm = kind != "ct" and from_teacher  # CD starts as its teacher (Song et al. 2023), CT from scratch
    student = Student(MLP(data.shape, width, zero=warm), sched, teacher if warm else None)
    target, average = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.Adam(student.residual.parameters(), lr=lr, fused=True)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / iterations)))
    g = torch.Generator().manual_seed(seed + 10)
    f, f_target = partial(cm.consistency, student, sched), partial(cm.consistency, target, sched)
    start = time.perf_counter()
    for i in range(iterations):
        x0 = data.sample(batch, generator=g).float()
        if kind == "ct":  # Song & Dhariwal 2023: pseudo-Huber, the N curriculum, lognormal n, no target EMA
            n = min(losses.ct_steps(i, iterations, 10, 1280), sched.T)
            loss = losses.ct_loss(f, f, sched, x0, N=n, grid=grid, generator=g)
        else:
            loss = losses.cd_loss(f, f_target, teacher, sched, x0, N=N, k=k, phases=phases, solver=solver, grid=grid,
                              weighting=weighting, generator=g)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.residual.parameters(), 1.0)
        optimizer.step()
        decay.step()
        if kind != "ct":
            ema_update(target.residual, student.residual, mu)
        ema_update(average.residual, student.residual, min(ema, (1 + i) / (10 + i)))
        if i % 1000 == 0:
            log(f"{kind} step {i}: loss {loss.item():.4g} ({time.perf_counter() - start:.0f} s)")
    return average.eval(), time.perf_counter() - start


def measure(samples: Tensor, endpoint: Tensor, data) -> dict:
    rms, other = mt.paired(data, samples, endpoint)
    return {"fd": data.frechet(samples), "rms": rms, "other": other}


# The students (name -> train() options). CD: Song et al. 2023's Karras grid (N = 18, their CIFAR-10 setting) with
# DPM-Solver++(2S) as the teacher's step (their Heun's analogue: 2 teacher calls); the grid's fixed point (the chain
# of teacher steps from x_T) is 0.035 RMS from the exact endpoint, 0.2% on another mode. CD and PCM start from
# scratch, not as the teacher: a student started as the exact teacher keeps its posterior mean's shrunken spread
# between t ~ 50 and 500 for thousands of steps (see the README). CT: iCT's recipe.
# CD's batch, target EMA and steps were chosen on the mixture and x_T of --seed 1, never the evaluation seed's table
# (3000 steps each; 1-step FD / RMS / other mode, 2-step FD): batch 256, mu = 0.95: 0.48 / 0.176 / 5.5%, 0.218;
# batch 512: 0.38 / 0.152 / 3.5%, 0.170 (the mode choice, 1.45x the time: the per-step overhead is shared); mu = 0
# (iCT's target, the student without gradients: the chain of 18 intervals propagates each step, not over ~20):
# 0.83 / 0.176 / 5.1%, 0.157; N = 40: 0.55 / 0.187 / 5.8%, 0.45 (slower propagation). CD gets the most steps: it
# is the student the goals are set for, and 3000 -> 6000 improved every cell. Batch 512 and mu = 0 together spoil the
# spread (seed 1: 0.75 / 0.159 / 3.6%, 0.438; seed 0's table with them: 2-step FD 0.805): batch 512 keeps mu = 0.95.
# 24000 steps (was 12000), fixed before either run below: seed 1 (2000 x_T), 1-step 0.152 / 0.091 / 1.3% against
# DPM-Solver++(2M) at 10 NFE 0.097 / 0.074 / 0.85%; seed 0 (this table) 0.097 / 0.088 / 1.1%, 2-step 0.080.
# 48000 steps, fixed before both runs, which ran side by side: seed 1, 1-step 0.119 / 0.076 / 0.85% against the same
# 0.097 / 0.074 / 0.85% (level); seed 0 (this table) 0.076 / 0.076 / 0.76% against 0.071 / 0.085 / 1.12%.
STUDENTS = {
    "CD (Karras N=18, DPM-Solver++(2S) teacher, L2 / (s_hi - s_lo), mu=0.95, batch 512, from scratch)": (
        "cd", 48000, {"from_teacher": False, "weighting": True, "batch": 512}),
    "PCM (M=2 phases, mu=0.95, batch 256, else as CD)": (
        "pcm", 6000, {"phases": 2, "from_teacher": False, "weighting": True}),
    "CT (pseudo-Huber, Karras N curriculum 10..1000, lognormal, no EMA)": ("ct", 6000, {}),
}  # fmt: skip


def sample(model, x_T: Tensor, sched, times: list[int], seed: int, noise: bool = True) -> Tensor:
    """Multistep consistency sampling through the given times (descending from T-1), in batches, float64 out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        parts = [cm.consistency_sampling(model, x.float(), sched, torch.tensor(times), generator=g, spacing=None,
                                         noise=noise) for x in x_T.split(2000)]  # fmt: skip
        return torch.cat(parts).double()


def search_times(model, data, sched, steps: int, x_T: Tensor, seed: int) -> list[int]:
    """Song et al. 2023's choice of the intermediate times (app. C): greedily, one time at a time below the last,
    the one whose samples from the held-out x_T have the lowest Frechet distance (each candidate judged with the
    times after it left out). Candidates: the 18-point Karras grid, the CD student's own."""
    times, candidates = [sched.T - 1], cm.karras(18, sched)[1:-1].tolist()
    for left in reversed(range(steps - 1)):  # leave `left` candidates below each choice for the later steps
        below = [t for t in candidates if t < times[-1]][left:]
        scores = {t: data.frechet(sample(model, x_T, sched, [*times, t], seed)) for t in below}
        times.append(min(scores, key=scores.get))
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--iterations", type=int, default=None, help="Adam steps for every student (default: each its own, STUDENTS)"
    )
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--search-samples", type=int, default=1000, help="held-out x_T for the intermediate times")
    parser.add_argument("--out", default=str(mt.RESULTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations {args.iterations}: a student needs at least 1 Adam step (omit it for the defaults)")
    torch.set_num_threads(1)  # small ops: threads only add synchronisation (28x slower on a busy 2-core CPU)
    data, sched, n = mt.image_mixture(seed=args.seed), schedule.linear(1000), args.samples
    exact = data.model(sched)
    x_T = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    held_out_seed = torch.Generator().manual_seed(args.seed + 7)  # the times are searched on other seeds
    held_out = torch.randn((args.search_samples, *data.shape), generator=held_out_seed, dtype=torch.float64)
    endpoint = mt.exact_endpoint(exact, x_T, sched)
    rows = {}  # name -> {steps: (nfe, measures)}
    for row in BASELINES:
        result = mt.table((row,), exact, data, sched, (10, 20, 50, 100), n, seed=args.seed, keep=True)
        cells = {}
        for s in (10, 20, 50, 100):
            cells[s] = (result["cells"][0, s].nfe, measure(result["samples"][mt.base_key(row), s], endpoint, data))
        rows[f"{row.name} ({row.spacing})"] = cells
    floor = mt.noise_floor(data, n, args.seed)
    seconds, chosen, steps = {}, {}, {}
    for name, (kind, iterations, options) in STUDENTS.items():
        steps[name] = args.iterations or iterations
        student, seconds[name] = train("cd" if kind == "pcm" else kind, data, sched, steps[name], **options)
        model = cm.ConsistencyModel(student, sched, options.get("phases", 1))
        cells = {}
        for s in (1, 2, 4):
            if kind == "pcm":  # deterministic between phase edges: the trailing times (2 steps = its 2 phases)
                times, noise = timesteps.trailing(s, sched.T).tolist(), False
            else:
                times, noise = search_times(model, data, sched, s, held_out, args.seed + 3), True
            chosen[name, s] = times
            cells[s] = (s, measure(sample(model, x_T, sched, times, args.seed + 1, noise), endpoint, data))
        rows[name] = cells
    text = report(rows, floor, seconds, args, data, chosen, steps)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "consistency_mixture.md").write_text(text)
    (out / "consistency_mixture.json").write_text(json.dumps(as_json(rows, floor, n, args.seed), indent=1) + "\n")
    plot(out / "consistency_mixture.png", rows, floor)
    return {"rows": rows, "floor": floor, "seconds": seconds, "times": chosen}


def as_json(rows: dict, floor, n: int, seed: int) -> dict:
    """The table for quality_vs_steps.py: one entry per method and step count, other_mode as a fraction; `seed` the
    mixture's (quality_vs_steps shows a run on another mixture's seed nowhere)."""
    out = [{"method": name, "steps": s, "nfe": int(nfe), "fd": m["fd"], "rms": m["rms"], "other_mode": m["other"]}
           for name, cells in rows.items() for s, (nfe, m) in sorted(cells.items())]  # fmt: skip
    out.append({"method": "noise floor: exact samples", "steps": 0, "nfe": 0, "fd": floor[0][0], "rms": 0.0,
                "other_mode": 0.0})  # fmt: skip
    return {"schedule": "linear", "shape": [3, 8, 8], "samples": n, "seed": seed, "rows": out}


def report(rows: dict, floor, seconds: dict, args, data, chosen: dict, steps: dict) -> str:
    (fd, fd_sd), _ = floor
    lines = [
        f"### Consistency students vs ODE samplers, exact teacher: {data}, linear schedule (T=1000), "
        f"{args.samples} samples",
        "",
        "Cells: Frechet distance to the data / paired RMS per pixel to the exact ODE endpoint from the same x_T / "
        "share of samples on another mode than that endpoint (NFE).",
        "",
        "| method | 1 | 2 | 4 | 10 | 20 | 50 | 100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cells in rows.items():
        row = []
        for s in (1, 2, 4, 10, 20, 50, 100):
            if s in cells:
                nfe, m = cells[s]
                row.append(f"{m['fd']:.3g} / {m['rms']:.3f} / {100 * m['other']:.1f}% ({nfe:g})")
            else:
                row.append("")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    times = "; ".join(f"{name.split(' ')[0]} {s} steps {ts}" for (name, s), ts in chosen.items() if s > 1)
    lines += [
        f"| noise floor: exact samples | {fd:.3g}±{fd_sd:.2g} | | | | | | |",
        "",
        "Columns are sampling steps (NFE in brackets: PNDM spends 9 more). CD and CT sample with fresh noise between "
        "steps (Song et al. 2023, Alg. 1), so their 2- and 4-step outputs are not functions of x_T alone: their "
        "paired measures there show how far re-noising moves a sample, not an error. Their intermediate times were "
        f"chosen greedily on {args.search_samples} held-out x_T (lowest Frechet distance; Song et al. 2023): "
        f"{times}. PCM samples deterministically between its phase edges (trailing times). Students are the EMA of "
        "the weights (rate 0.999). Adam steps and training wall time on this CPU (2 shared cores, one thread): "
        + ", ".join(f"{name.split(' ')[0]} {steps[name]} steps, {s:.0f} s" for name, s in seconds.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: dict, floor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, (name, cells) in enumerate(rows.items()):
        steps = sorted(cells)
        nfe = [cells[s][0] for s in steps]
        kw = dict(marker="o", markersize=4, color=f"C{i}", label=name)
        axes[0].plot(nfe, [cells[s][1]["fd"] for s in steps], **kw)
        axes[1].plot(nfe, [cells[s][1]["rms"] for s in steps], **kw)
    (fd, fd_sd), _ = floor
    axes[0].axhspan(max(fd - fd_sd, fd / 10), fd + fd_sd, color="0.85", zorder=0)
    axes[0].axhline(fd, color="0.5", linewidth=1, label="noise floor (exact samples)")
    axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="Frechet distance (data space)")
    axes[1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="paired RMS to the exact ODE endpoint")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
