"""Quality vs NFE on a known distribution: every sampler and option at 5 / 10 / 20 / 50 / 100 model evaluations.

    python benchmarks/quality_vs_steps.py [--schedule linear|cosine|both] [--nfe 5,10,20,50,100] [--samples 10000]
    python benchmarks/quality_vs_steps.py --checkpoint outputs/.../last.ckpt [--device cuda] [--batch 1000]

The data is a mixture of Gaussian images (3x8x8 by default: 6 modes of random +-0.6 blocks, weights 1 : 2 : ... : 6,
std 0.1) whose optimal noise predictor is known in closed form (diffusion.mixture), so what separates a sampler's
output from the data is the sampler's own error: no training, no Inception network. Each column is a budget of
model evaluations (NFE); each row takes the number of steps S that spends exactly that budget (F-PNDM: 4S - 3 for
S <= 3, S + 9 after; S-PNDM and PLMS: S + 1; the others S), and a budget no S meets is left blank; FON, whose
4 (S - 1) + 1 meets few budgets, takes the most steps within the budget, its NFE said. PF (adaptive RK45) picks
its own NFE: a second table, one row per tolerance. Each cell: the
Frechet distance in data space to the mixture's mean and covariance, the mode-weight error (total variation between
the true weights and the share of samples nearest each mean), S; after the dot, paired measures (below). Every row
starts from the same x_T (float64) and no sampler clips x0 (the data is unbounded). The noise floor is the same
metrics on exact samples of the same size (mean +- sd over 5 draws): below it, a difference is sampling noise.
Analytic-DPM's rows use Gamma of the model itself (Monte Carlo over --gamma-m mixture samples, estimate_gamma) and
bound Cov[x0 | x_t] by the variance of the same samples (Theorem 2's bound for unbounded data: analytic.cov_bound).
Writes quality_<schedule>.md and quality_<schedule>.png (error vs NFE) to --out. The closed form's consistency
students (issue 13) come from benchmarks/consistency_mixture.py's JSON (--consistency): a second table and stars on
the plot, when it was made for the same schedule, shape and mixture seed.

Closed form: each cell is paired with the exact probability-flow ODE endpoint of the same x_T (PF at rtol = atol =
ENDPOINT_TOL, from the log-SNR grid's start to t = 0, then x0): RMS per pixel and the share of samples on another
mode: a deterministic sampler's own discretisation error (a stochastic one lands elsewhere by design). With
--checkpoint, the model is a network trained by train.py on `data=mixture` (`experiment=mixture`), with DeepCache
and Skip-Tuning rows; the same rows run with the exact noise predictor of that mixture first, and each trained cell
is paired with its exact twin (same sampler, steps, x_T and noise): the network's own error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The closed form's matrices are small (192 x 192): BLAS threads only add synchronisation, up to 100x on a busy CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: benchmarks.* from the repository root

import argparse  # noqa: E402
import re  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.consistency_students import read_students, students_markdown  # noqa: E402
from benchmarks.mixture_testbed import (  # noqa: E402
    ENDPOINT_TOL,
    FLOOR_DRAWS,
    RESULTS,
    Refused,
    Row,
    image_mixture,
    load_checkpoint,
    nfe_steps,
    table,
)
from diffusion import (
    sampling,
    schedule,  # noqa: E402
)
from diffusion.errors import UsageError  # noqa: E402
from diffusion.sampling import analytic

SKIP_RHO = (1.0, 0.8)  # Skip-Tuning's config default, used when results/skip_tuning.md has no sweep to read
NO_CAP = {"noise_cap": None}  # Analytic-DPM's cap on the last noise is in 8-bit levels: the mixture has none
ROWS = (
    Row("ddpm, σ²=β", sampling.ddpm, options={"variance": "beta"}),
    Row("ddpm, σ²=β̃ (= ddim η=1)", sampling.ddpm),
    Row("ddpm, σ²=β", sampling.ddpm, "even", {"variance": "beta"}),
    Row("ddpm, σ²=β̃ (= ddim η=1)", sampling.ddpm, "even"),
    Row("ddpm, σ²=β̃ (= ddim η=1)", sampling.ddpm, "logsnr"),
    Row("analytic_ddpm", analytic.analytic_ddpm, "even", NO_CAP),
    Row("analytic_ddpm", analytic.analytic_ddpm, "analytic_optimal", NO_CAP),
    Row("analytic_ddpm", analytic.analytic_ddpm, "logsnr", NO_CAP),
    Row("analytic_ddim η=0", analytic.analytic_ddim, "even", NO_CAP),
    Row("analytic_ddim η=0", analytic.analytic_ddim, "analytic_optimal", NO_CAP),
    Row("analytic_ddim η=0", analytic.analytic_ddim, "logsnr", NO_CAP),
    Row("ddim η=0", sampling.ddim),
    Row("ddim η=0", sampling.ddim, "logsnr"),
    Row("pndm (F-PNDM)", sampling.pndm),
    Row("s_pndm", sampling.s_pndm),
    Row("plms", sampling.plms),
    Row("fon (RK4)", sampling.fon),
    Row("dpm_solver++(2M)", sampling.dpm_solver, "logsnr"),
    Row("dpm_solver++(2M)", sampling.dpm_solver),
    Row("dpm_solver++(3M)", sampling.dpm_solver_3m, "logsnr"),
    Row("unipc order 2", sampling.unipc, "logsnr", {"order": 2}),
    Row("unipc order 3", sampling.unipc, "logsnr", {"order": 3}),
    Row("unipc order 2, bh1", sampling.unipc, "logsnr", {"order": 2, "variant": "bh1"}),
    Row("unipc order 3, bh1", sampling.unipc, "logsnr", {"order": 3, "variant": "bh1"}),
)
# PF (adaptive RK45) chooses its own NFE: one row per tolerance, in a table of its own. It starts where the exact
# endpoint does (the log-SNR grid's start: PF takes timesteps[0] of 2 logsnr steps, since one is T-1), so its paired
# error is its tolerance's alone.
PF_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)
PF_ROWS = tuple(Row(f"pf, rtol = atol = {tol:g}", sampling.pf, "logsnr", {"rtol": tol, "atol": tol})
                for tol in PF_TOLERANCES)  # fmt: skip
OWN_METHODS = frozenset(f"{r.name} ({r.spacing})" for r in ROWS)  # a students' file's baselines: measured here


def deepcache(model, ts: Tensor, **options):
    """DeepCache (Ma et al. 2024) around `model`, planned on the sampler's timesteps `ts`."""
    from diffusion.wrappers.deepcache import DeepCache

    try:
        return DeepCache(model, ts, **options)
    except ValueError as error:
        raise Refused(str(error).split(":")[0]) from error


def skip_tuning(model, ts: Tensor, rho: tuple[float, float]):
    """Skip-Tuning (Ma et al. 2024) around `model`: skips scaled from rho[0] (top) to rho[1] (bottom)."""
    from diffusion.wrappers.skiptuning import SkipTuning

    return SkipTuning(model, rho_top=rho[0], rho_bottom=rho[1])


OFFICIAL = {"schedule": "official", "center": 0.5, "power": 1.4}  # the official --center S/2 --pow 1.4
DEEPCACHE_ROWS = tuple(
    Row(f"ddim η=0 + DeepCache N={n}{', official' * bool(o)}", sampling.ddim, wrap=partial(deepcache, interval=n, **o))
    for o in ({}, OFFICIAL)
    for n in (2, 3, 5)
)


def skip_rows(rho: tuple[float, float]) -> tuple[Row, ...]:
    """Skip-Tuning around the two few-step ODE samplers it is meant for (DDIM, DPM-Solver++(2M) on log-SNR steps)."""
    name = f"+ Skip-Tuning ρ {rho[0]:g}:{rho[1]:g}"
    wrap = partial(skip_tuning, rho=rho)
    return (Row(f"ddim η=0 {name}", sampling.ddim, wrap=wrap),
            Row(f"dpm_solver++(2M) {name}", sampling.dpm_solver, "logsnr", wrap=wrap))  # fmt: skip


def skip_rho(path: Path) -> tuple[tuple[float, float], str]:
    """The rho_top:rho_bottom other than 1:1 that benchmarks/skip_tuning.py's sweep found best (bold) in the most
    rows, and where it came from; SKIP_RHO if there is no sweep to read. Rows where the plain network won count for
    no rho (they are said)."""
    lines = path.read_text().splitlines() if path.exists() else []
    head = next((line for line in lines if line.startswith("| sampler | NFE |")), None)
    if head is None:
        return SKIP_RHO, f"{path.name} not found or without a sweep: the config default"
    names = [c.strip() for c in head.strip("|").split("|")]
    wins, rows = {}, 0
    for line in lines[lines.index(head) + 2 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("|") or len(cells) != len(names):
            break
        rows += 1
        for name, cell in zip(names, cells, strict=True):
            if cell.startswith("**") and (m := re.search(r"ρ ([\d.]+):([\d.]+)", name)):
                wins[float(m[1]), float(m[2])] = wins.get((float(m[1]), float(m[2])), 0) + 1
    plain = wins.pop((1.0, 1.0), 0)
    if not wins:
        return SKIP_RHO, f"no ρ other than 1:1 was best in {path.name}: the config default"
    best = max(wins, key=wins.get)
    return best, f"best in {wins[best]} of {rows} rows of {path.name}, the most of any ρ but 1:1 (best in {plain})"


# ---------------------------------------------------------------- reporting


def markdown(title: str, rows: Sequence[Row], columns: Sequence[int], result: dict, notes: Sequence[str] = (),
             students: Sequence[dict] = (), after: str = "") -> str:  # fmt: skip
    """The table: one row per sampler configuration, one column per NFE budget, the noise floor, the notes; `after`
    (PF's table) and the consistency students' table (`read_students`) below it."""
    lines = [f"### {title}", "",
             "Cells: Frechet distance in data space / mode-weight error (total variation), the steps S that spend the",
             "column's NFE (F: DeepCache's full UNet calls); after the dot, paired measures from the same x_T: RMS",
             "per pixel, share of samples on another mode (see the notes).", "",
             "| sampler | spacing | " + " | ".join(f"{c} NFE" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]  # fmt: skip
    for i, row in enumerate(rows):
        texts = []
        for col in columns:
            c = result["cells"].get((i, col))
            if c is None:
                texts.append("")
                continue
            extra = (f", F={c.full:g}" if c.full is not None else "") + (f", {c.nfe:g} NFE" if c.nfe != col else "")
            vs = f" · {c.paired[0]:.3f}, {100 * c.paired[1]:.1f}%" if c.paired else ""
            texts.append(f"{c.frechet:.3g} / {c.mode_error:.3f} (S={c.steps}{extra}){vs}")
        lines.append(f"| {row.name} | {row.spacing} | " + " | ".join(texts) + " |")
    (fd, fd_sd), (mwe, mwe_sd) = result["floor"]
    floor = f"{fd:.3g}±{fd_sd:.2g} / {mwe:.3f}±{mwe_sd:.3f}"
    lines.append("| noise floor: exact samples | | " + " | ".join([floor] * len(columns)) + " |")
    blanks = {}
    for (i, col), why in result["blank"].items():
        blanks.setdefault((rows[i].name, why), []).append(str(col))
    lines += ["", f"Every row starts from the same x_T; the floor is the mean ± sd over {FLOOR_DRAWS} draws of exact "
              "samples. No sampler clips x0. Spacings: leading = floor(i T / S) (DDIM), even = Analytic-DPM's even "
              "trajectory, analytic_optimal = its DP trajectory on the model's Gamma, logsnr = the first S of S + 1 "
              "points uniform in log-SNR down to t = 0 (DPM-Solver's grid; from the official code's cut, lambda >= "
              "-5.1: t = 995 on the cosine schedule).",
              *notes]  # fmt: skip
    lines += [f"Blank: {name} at {', '.join(cols)} NFE: {why}." for (name, why), cols in blanks.items()]
    tail = students_markdown(students)  # its first line is blank, as `after`'s
    return "\n".join(lines) + "\n" + after + ("\n".join(tail) + "\n" if tail else "")


def pf_markdown(result: dict) -> str:
    """PF's table: one row per tolerance, the NFE its solver chose (per sample batch), the cell's measures."""
    lines = ["", "### PF: the probability-flow ODE by adaptive RK45 (Song et al. 2021), the NFE its tolerance chose",
             "", "| sampler | start | NFE | Frechet / mode-weight error · paired RMS, other mode |",
             "|---|---|---|---|"]  # fmt: skip
    for i, row in enumerate(PF_ROWS):
        c = result["cells"][i, 0]
        vs = f" · {c.paired[0]:.3g}, {100 * c.paired[1]:.1f}%" if c.paired else ""
        lines.append(f"| {row.name} | {row.spacing} | {c.nfe:g} | {c.frechet:.3g} / {c.mode_error:.3f}{vs} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, rows: Sequence[Row], columns: Sequence[int], result: dict,
         students: Sequence[dict] = (), pf: dict | None = None) -> None:  # fmt: skip
    """Frechet distance and the paired RMS (or the mode-weight error) against NFE, log-log, with the noise floor;
    the consistency students as stars above the legend (paired RMS on the right: only beside paired cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_pair = any(c.paired for c in result["cells"].values())
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for i, row in enumerate(rows):
        cells = [result["cells"][i, c] for c in columns if (i, c) in result["cells"]]
        style = "-" if row.spacing in ("leading", "logsnr") else "--"  # dashed: Analytic-DPM's trajectories
        kw = dict(marker="os^D"[i // 10 % 4], markersize=4, linestyle=style, color=f"C{i % 10}")
        axes[0].plot([c.nfe for c in cells], [c.frechet for c in cells], label=f"{row.name} ({row.spacing})", **kw)
        second = [c.paired[0] if has_pair else c.mode_error for c in cells]
        axes[1].plot([c.nfe for c in cells], second, **kw)
    for j, method in enumerate(dict.fromkeys(r["method"] for r in students if not r["floor"])):
        mine = [r for r in students if r["method"] == method]
        kw = dict(marker="*PXh"[j % 4], s=60, color=f"C{(j + 3) % 10}", edgecolor="k", zorder=6)
        axes[0].scatter([r["nfe"] for r in mine], [r["fd"] for r in mine], label=f"{method} (consistency)", **kw)
        if has_pair:
            axes[1].scatter([r["nfe"] for r in mine], [r["rms"] for r in mine], **kw)
    if pf:  # PF: one point per tolerance, at the NFE it chose
        cells = [pf["cells"][i, 0] for i in range(len(PF_ROWS))]
        kw = dict(marker="X", color="k", linestyle=":", label="pf (RK45), rtol = atol = 1e-2 .. 1e-5")
        axes[0].plot([c.nfe for c in cells], [c.frechet for c in cells], **kw)
        axes[1].plot([c.nfe for c in cells], [c.paired[0] if has_pair else c.mode_error for c in cells], **kw)
    (mean, sd), _ = result["floor"]
    axes[0].axhspan(max(mean - sd, mean / 10), mean + sd, color="0.85", zorder=0)
    axes[0].axhline(mean, color="0.5", linewidth=1, zorder=0, label="noise floor (exact samples)")
    second = "paired RMS per pixel (see the table)" if has_pair else "mode-weight error"
    for ax, name in zip(axes, ("Frechet distance (data space)", second), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="NFE (model evaluations)", ylabel=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the script


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    schedules = ("linear", "cosine", "both")
    parser.add_argument("--schedule", choices=schedules, help="the closed form's schedule(s), T=1000 (default: both)")
    parser.add_argument("--nfe", default="5,10,20,50,100", help="comma-separated NFE budgets (the columns)")
    parser.add_argument("--samples", type=int, default=10000, help="samples per cell (and for the noise floor)")
    parser.add_argument("--gamma-m", type=int, default=1000, help="mixture samples for Analytic-DPM's Gamma")
    parser.add_argument("--endpoint-tol", type=float, default=ENDPOINT_TOL,
                        help="rtol = atol of the PF run that is the exact ODE endpoint")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS), help="folder for the .md tables and .png plots")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a train.py checkpoint trained with data=mixture")
    parser.add_argument("--skip-tuning", default=str(RESULTS / "skip_tuning.md"),
                        help="benchmarks/skip_tuning.py's results, for the Skip-Tuning rows' rho")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="samples per sampler call (default: all at once)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the closed form's small ops)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write the tables only")
    parser.add_argument("--consistency", default=str(RESULTS / "consistency_mixture.json"),
                        help="consistency_mixture.py's JSON: its students as rows and points when schedule and shape "
                        "match (closed form only; 'none' to leave them out)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.nfe = [int(s) for s in args.nfe.split(",")]
    except ValueError:
        parser.error(f"--nfe must be comma-separated integers such as 5,10,20,50,100, got {args.nfe!r}")
    if any(s < 1 for s in args.nfe) or args.samples < 2 or (args.batch is not None and args.batch < 1):
        parser.error("need --nfe >= 1 each, --samples >= 2 and --batch >= 1")
    if not 0 < args.endpoint_tol < 1:
        parser.error(f"--endpoint-tol must lie in (0, 1) (the exact ODE endpoint's tolerance), got {args.endpoint_tol}")
    if args.gamma_m < 1:
        parser.error(f"--gamma-m must be >= 1 (the paper: 10-100 already close), got {args.gamma_m}")
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
    opts = dict(steps=nfe_steps, seed=args.seed, batch=args.batch, device=args.device, gamma_m=args.gamma_m)
    gamma = f"Gamma by Monte Carlo over M = {args.gamma_m} mixture samples, Cov[x0 | x_t] bounded by their variance"
    jobs = []  # (file name, title, rows, model, data, schedule, notes, consistency students)
    consistency = Path(args.consistency) if args.consistency != "none" else None
    if args.checkpoint:
        model, sched, data, about = load_checkpoint(args.checkpoint, args.device)
        where = f"{sched.name} schedule, T={sched.T}, {data}, {args.samples} samples, {gamma}"
        rho, source = skip_rho(Path(args.skip_tuning))
        notes = (f"Paired: against the exact predictor's samples from the same x_T and noise (same sampler and S; "
                 f"analytic_optimal: on the exact predictor's own trajectory), the network's own error. Skip-Tuning "
                 f"ρ {rho[0]:g}:{rho[1]:g}: {source}. DeepCache: branch below the first level; official = the "
                 f"official non-uniform rule at centre S/2, pow 1.4.",)  # fmt: skip
        jobs.append((f"quality_checkpoint_{sched.name}_exact", f"Exact noise predictor ({where})",
                     ROWS, data.model(sched), data, sched, (), []))  # fmt: skip
        jobs.append((f"quality_checkpoint_{sched.name}", f"Trained model {about} ({where})",
                     ROWS + DEEPCACHE_ROWS + skip_rows(rho), model, data, sched, notes, []))  # fmt: skip
    else:
        data = image_mixture(seed=args.seed)
        notes = (f"Paired: against the exact probability-flow ODE endpoint of the same x_T (PF, scipy's RK45 at rtol "
                 f"= atol = {args.endpoint_tol:g}, from the log-SNR grid's start to t = 0, then x0); for the "
                 "stochastic rows (ddpm, analytic_*) a measure of how far their noise moves a sample, not an error. "
                 "Consistency students (CD / CT / PCM at 1, 2, 4 steps; benchmarks/consistency_mixture.py trains "
                 "them and writes its JSON): a second table below and stars on the plot, where that JSON is there "
                 "for this schedule.",)  # fmt: skip
        for name in ("linear", "cosine") if args.schedule in (None, "both") else (args.schedule,):
            sched = getattr(schedule, name)(T=1000)
            title = f"Exact noise predictor, {name} schedule (T=1000), {data}, {args.samples} samples, {gamma}"
            # read (and checked) now, not after the long run
            students, said = (
                read_students(consistency, sched, data, args.seed, OWN_METHODS) if consistency else ([], "")
            )
            jobs.append((f"quality_{name}", title, ROWS, data.model(sched), data, sched, (*notes, said), students))
    # With a checkpoint, the exact table runs first and keeps its samples for the trained table's paired columns.
    exact = None
    for file, title, rows, model, data, sched, notes, students in jobs:
        if max(args.nfe) > sched.T:
            raise UsageError(f"--nfe {max(args.nfe)} exceeds the schedule's T={sched.T} steps")
        keep = bool(args.checkpoint) and exact is None
        endpoint = 0 if args.checkpoint else args.endpoint_tol
        result = table(rows, model, data, sched, args.nfe, args.samples, keep=keep, exact=exact, endpoint=endpoint,
                       **opts)  # fmt: skip
        pf = table(PF_ROWS, model, data, sched, (0,), args.samples, keep=keep, exact=exact, endpoint=endpoint,
                   reference=result["reference"], **(opts | {"steps": lambda row, c: 2}))  # fmt: skip
        if keep:
            exact = result.pop("samples") | pf.pop("samples")  # large: not returned
        timing = (f"Run time: {result['seconds'] + pf['seconds']:.0f} s on this CPU ({result['gamma_seconds']:.0f} s "
                  "of it for Gamma).")  # fmt: skip
        text = markdown(title, rows, args.nfe, result, tuple(n for n in (*notes, timing) if n), students,
                        pf_markdown(pf))  # fmt: skip
        print(text, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{file}.md").write_text(text)
        if args.plot:
            plot(out / f"{file}.png", title, rows, args.nfe, result, students, pf)
        results[file] = result | {"pf": pf}
    return results


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
