"""Consistency models against the exact ODE on a known distribution: CD, CT and PCM students at 1, 2 and 4 steps
next to DDIM, DPM-Solver++ and PNDM at 10 to 100 NFE.

    python benchmarks/consistency_mixture.py [--iterations 3000] [--samples 10000] [--out benchmarks/results]

The data is quality_vs_steps.py's mixture of Gaussian images (3x8x8, 6 modes) on the linear schedule (T = 1000),
whose exact noise predictor is the CD teacher: no teacher error, so what separates a student from the exact
consistency function (the probability-flow ODE's solution map) is the distillation's own error. The exact ODE
endpoint of each x_T is a 500-step DPM-Solver++ run. Measures: the paired RMS distance per pixel to that endpoint
from the same x_T, the share of samples on another mode than the endpoint's, the Frechet distance to the data (the
noise floor: exact samples of the same size), and NFE.

Students: an MLP predicts a correction to the exact teacher's x0 (its last layer starts at zero, so CD's student
starts as its teacher: Song et al. 2023 initialise the student from the teacher; here the teacher is a formula, not
a network), turned into eps. An MLP, not a UNet: 8x8 images need no convolutions, and it trains in minutes on a
CPU. It corrects x0, not eps, because x0 = (x - sigma eps) / alpha multiplies an eps error by 156 at t = T-1. CT has
no teacher: its student is the MLP's x0 alone, from scratch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_vs_steps as qvs  # noqa: E402

from diffusion import consistency as cm  # noqa: E402
from diffusion import samplers, schedule, timesteps  # noqa: E402
from diffusion.training import ema_update  # noqa: E402

BASELINES = (
    qvs.Row("ddim η=0", samplers.ddim),
    qvs.Row("dpm_solver++(2M)", samplers.dpm_solver, "logsnr"),
    qvs.Row("pndm (F-PNDM)", samplers.pndm),
)


class MLP(nn.Module):
    """eps-residual for flattened images: [x, sinusoidal(t)] -> 3 SiLU layers of `width` -> eps [B, C, H, W]."""

    def __init__(self, shape: tuple[int, ...], width: int = 512, zero: bool = True) -> None:
        super().__init__()
        dim = math.prod(shape)
        self.shape = shape
        self.net = nn.Sequential(nn.Linear(dim + 64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))  # fmt: skip
        if zero:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        freqs = torch.exp(-math.log(1e4) * torch.arange(32, device=x.device) / 32)
        angle = (t.float() + 1)[:, None] * freqs
        h = torch.cat([x.flatten(1).float(), angle.sin(), angle.cos()], 1)
        return self.net(h).reshape(x.shape).to(x.dtype)


class Student(nn.Module):
    """eps-model around an MLP that predicts x0: the exact teacher's x0 + the MLP's correction r, or (CT, no teacher)
    the MLP's x0 alone, turned into eps = (x - alpha x0) / sigma. x0 = (x - sigma eps) / alpha amplifies an error in
    eps by sigma / alpha (156 at t = T-1), so a network that outputs eps must be 156x more precise there."""

    def __init__(self, residual: MLP, sched, teacher=None) -> None:
        super().__init__()
        self.residual, self.teacher = residual, teacher
        self.register_buffer("abar", sched.alphas_cumprod.float(), persistent=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        abar = self.abar[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        r = self.residual(x, t)
        if self.teacher is None:
            return (x - alpha * r) / sigma
        return self.teacher(x, t) - alpha / sigma * r  # x0 = the teacher's x0 + r


def train(kind: str, data, sched, iterations: int, *, batch: int = 256, lr: float = 1e-4, N: int = 50, mu: float = 0.95,
          phases: int = 1, solver: str = "ddim", seed: int = 0) -> tuple[Student, float]:  # fmt: skip
    """A CD, CT or PCM student after `iterations` Adam steps; returns it and the training wall time (s)."""
    torch.manual_seed(seed)
    teacher = data.model(sched)
    student = Student(MLP(data.shape, zero=kind != "ct"), sched, None if kind == "ct" else teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.Adam(student.residual.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 10)
    f, f_target = partial(cm.consistency, student, sched), partial(cm.consistency, target, sched)
    start = time.perf_counter()
    for i in range(iterations):
        x0 = data.sample(batch, generator=g).float()
        if kind == "ct":  # Song & Dhariwal 2023: pseudo-Huber, the N curriculum, lognormal n, no target EMA
            n = min(cm.ct_steps(i, iterations, 10, 1280), sched.T)
            loss = cm.ct_loss(f, f, sched, x0, N=n, generator=g)
        else:
            loss = cm.cd_loss(f, f_target, teacher, sched, x0, N=N, phases=phases, solver=solver, generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.residual.parameters(), 1.0)
        optimizer.step()
        if kind != "ct":
            ema_update(target.residual, student.residual, mu)
        if i % 500 == 0:
            print(f"{kind} step {i}: loss {loss.item():.4g}", flush=True)
    return student.eval(), time.perf_counter() - start


def measure(samples: Tensor, endpoint: Tensor, data) -> dict:
    rms, other = qvs.paired(data, samples, endpoint)
    return {"fd": data.frechet(samples), "rms": rms, "other": other}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1200, help="Adam steps per student")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--out", default=str(qvs.RESULTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small ops: threads only add synchronisation (28x slower on a busy 2-core CPU)
    data, sched, n = qvs.image_mixture(seed=args.seed), schedule.linear(1000), args.samples
    exact = data.model(sched)
    x_T = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    endpoint = samplers.dpm_solver(exact, x_T, sched, timesteps.logsnr(500, sched), clip=False)
    rows = {}  # name -> {steps: (nfe, measures)}
    for row in BASELINES:
        result = qvs.table((row,), exact, data, sched, (10, 20, 50, 100), n, seed=args.seed, keep=True)
        cells = {}
        for s in (10, 20, 50, 100):
            cells[s] = (result["cells"][0, s].nfe, measure(result["samples"][qvs.base_key(row), s], endpoint, data))
        rows[f"{row.name} ({row.spacing})"] = cells
    floor = qvs.noise_floor(data, n, args.seed)
    cd = {"N": 10, "solver": "dpm_solver", "lr": 1e-3}  # 10 intervals: the boundary's signal climbs 10 steps, not 50
    students = {"CD (N=10, DPM-Solver++(2S) teacher, L2, mu=0.95)": ("cd", cd),
                "PCM (M=2 phases, else as CD)": ("pcm", {**cd, "phases": 2}),
                "CT (pseudo-Huber, N curriculum 10..1000, lognormal, no EMA)": ("ct", {"lr": 1e-3})}  # fmt: skip
    seconds = {}
    for name, (kind, options) in students.items():
        student, seconds[name] = train("cd" if kind == "pcm" else kind, data, sched, args.iterations, **options)
        model = cm.ConsistencyModel(student, sched, options.get("phases", 1))
        cells = {}
        for s in (1, 2, 4):
            g = torch.Generator().manual_seed(args.seed + 1)
            noise = kind != "pcm"  # PCM: deterministic between phase edges (2 steps = its 2 phases)
            with torch.no_grad():
                out = torch.cat([cm.consistency_sampling(model, x.float(), sched, torch.zeros(s), generator=g,
                                                         noise=noise) for x in x_T.split(2000)]).double()  # fmt: skip
            cells[s] = (s, measure(out, endpoint, data))
        rows[name] = cells
    text = report(rows, floor, seconds, args, data)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "consistency_mixture.md").write_text(text)
    plot(out / "consistency_mixture.png", rows, floor)
    return {"rows": rows, "floor": floor, "seconds": seconds}


def report(rows: dict, floor, seconds: dict, args, data) -> str:
    (fd, fd_sd), _ = floor
    lines = [
        f"### Consistency students vs ODE samplers, exact teacher: {data}, linear schedule (T=1000), "
        f"{args.samples} samples, {args.iterations} Adam steps per student",
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
    lines += [
        f"| noise floor: exact samples | {fd:.3g}±{fd_sd:.2g} | | | | | | |",
        "",
        "Columns are sampling steps (NFE in brackets: PNDM spends 9 more). CD and CT sample with fresh noise between "
        "steps (Song et al. 2023, Alg. 1), so their 2- and 4-step outputs are not functions of x_T alone: their "
        "paired measures there show how far re-noising moves a sample, not an error. PCM samples deterministically "
        "between its 2 phase edges. Training wall time on this CPU (2 shared cores): "
        + ", ".join(f"{name.split(' ')[0]} {s:.0f} s" for name, s in seconds.items())
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
