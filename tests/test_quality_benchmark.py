"""benchmarks/quality_vs_steps.py on tiny settings: the table's shape, every row at exactly its column's NFE (counted
calls) and blank where no step count meets it, the noise floor below DDIM's 10-NFE error, the paired measures, the
Skip-Tuning rho read from the sweep, and the checkpoint mode's plumbing (an untrained UNet on data=mixture)."""

from __future__ import annotations

import os

# The benchmark's Frechet distance runs eigh on 192 x 192 matrices: on a busy CPU, threaded OpenBLAS spins up to 60x
# slower. Set before numpy loads (as the benchmark script does); in a whole-suite run an earlier file may load it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.consistency_students import read_students  # noqa: E402
from benchmarks.mixture_testbed import AT_MOST, Row, exact_endpoint, image_mixture, nfe_steps, table  # noqa: E402
from benchmarks.quality_vs_steps import (  # noqa: E402
    DEEPCACHE_ROWS,
    OWN_METHODS,
    ROWS,
    SKIP_RHO,
    main,
    skip_rho,
    skip_rows,
)
from diffusion import sampling, timesteps  # noqa: E402
from diffusion.errors import UsageError  # noqa: E402
from diffusion.io.checkpoints import CheckpointError  # noqa: E402
from diffusion.schedule import cosine, linear  # noqa: E402
from diffusion.unet import UNet  # noqa: E402
from diffusion.wrappers.deepcache import official_steps, uniform_steps  # noqa: E402

CELL = re.compile(r"^([\d.e+-]+) / ([\d.]+) \(S=(\d+)(?:, F=(\d+))?(?:, \d+ NFE)?\)(?: · ([\d.]+), ([\d.]+)%)?$")


def parse_table(text: str, columns: list[int]) -> tuple[dict[tuple[str, str], list[tuple | None]], list[str]]:
    """{(sampler, spacing): [(frechet, mode error, S, full, RMS paired, % flipped; None where absent) or None for a
    blank cell, per column]}, and the floor's cells: the first table."""
    first = text.split("\n\n| ")[1].split("\n\n")[0]  # PF's and the consistency students' tables may follow
    lines = ["| " + first.splitlines()[0], *first.splitlines()[1:]]
    assert lines[0] == "| sampler | spacing | " + " | ".join(f"{c} NFE" for c in columns) + " |"
    rows = {}
    for line in lines[2:-1]:
        name, spacing, *cells = (c.strip() for c in line.strip("|").split("|"))
        assert len(cells) == len(columns), line
        parsed = [CELL.match(c) if c else None for c in cells]
        assert all(m or not c for m, c in zip(parsed, cells, strict=True)), line
        rows[name, spacing] = [
            m and (float(m[1]), float(m[2]), int(m[3]), m[4] and int(m[4]), m[5] and float(m[5]), m[6] and float(m[6]))
            for m in parsed
        ]
    floor = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert floor[0] == "noise floor: exact samples" and len(floor) == 2 + len(columns)
    return rows, floor[2:]


def test_nfe_steps_inverts_the_counted_calls_of_every_sampler():
    """For every row and every budget 1..30: the S it picks spends exactly the budget (counted), and None only where
    no S up to 30 does (all of this small space); an AT_MOST row (FON: 4 (S - 1) + 1) takes the most steps within."""
    sched, x = linear(T=1000), torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    gamma = torch.full((1000,), 0.5, dtype=torch.float64)
    assert AT_MOST <= {r.sampler.__name__ for r in ROWS}
    for row in {r.sampler.__name__: r for r in ROWS}.values():
        counts = {}
        takes = inspect.signature(row.sampler).parameters
        for S in range(1, 31):
            calls = []
            options = row.options | ({"gamma": gamma, "data_var": 1.0} if "analytic" in row.sampler.__name__ else {})
            options |= {"clip": False} if "clip" in takes else {}
            row.sampler(lambda x, t, calls=calls: calls.append(1) or torch.zeros_like(x), x, sched,
                        torch.arange(999, -1, -1000 // S)[:S], **options)  # fmt: skip
            counts[S] = len(calls)
        for budget in range(1, 31):
            if row.sampler.__name__ in AT_MOST:
                within = [S for S, n in counts.items() if n <= budget]
                assert nfe_steps(row, budget) == (max(within) if within else None), (row.name, budget)
            else:
                reachable = [S for S, n in counts.items() if n == budget]
                assert nfe_steps(row, budget) == (min(reachable) if reachable else None), (row.name, budget)
    assert nfe_steps(ROWS[[r.sampler for r in ROWS].index(sampling.pndm)], 10) is None  # F-PNDM: 9 or 13


def test_closed_form_table_rows_columns_nfe_and_noise_floor(tmp_path):
    columns = [5, 10]
    argv = ["--schedule", "linear", "--nfe", "5,10", "--samples", "500", "--gamma-m", "20", "--endpoint-tol", "1e-5"]
    (tmp_path / "students.json").write_text(json.dumps(STUDENTS))
    results = main([*argv, "--out", str(tmp_path), "--consistency", str(tmp_path / "students.json")])
    text = (tmp_path / "quality_linear.md").read_text()
    rows, _ = parse_table(text, columns)
    tail = text.split("| method | steps | NFE | Frechet | paired RMS | other mode |\n|---|---|---|---|---|---|\n")[1]
    assert tail.splitlines() == [
        "| CD | 1 | 1 | 2.74 | 0.216 | 6.7% |",
        "| CD | 2 | 2 | 2.19 | 0.416 | 27.1% |",
        "| CT | 1 | 1 | 74.3 | 0.751 | 60.4% |",
        "| noise floor: exact samples | | | 0.0458 | | |",
    ]
    assert "Consistency students, exact teacher (5000 samples)" in text and "students.json (5000 samples" in text
    assert "its rows for ddim η=0 (leading) are left out (this table's own rows)" in text  # fmt: skip
    assert list(rows) == [(r.name, r.spacing) for r in ROWS]
    assert (tmp_path / "quality_linear.png").stat().st_size > 10_000
    assert not (tmp_path / "quality_cosine.md").exists()

    result = results["quality_linear"]
    for i, row in enumerate(ROWS):
        for c in columns:
            if nfe_steps(row, c) is None:
                assert (i, c) not in result["cells"] and rows[row.name, row.spacing][columns.index(c)] is None
            elif row.sampler.__name__ in AT_MOST:  # the most steps within the column, its NFE as counted
                assert nfe_steps(row, c) is not None and result["cells"][i, c].nfe <= c, (row, c)
            else:  # the documented NFE, as counted while sampling, is the column's
                assert result["cells"][i, c].nfe == c, (row, c)
    assert "Blank: pndm (F-PNDM) at 10 NFE" in text and len(result["blank"]) == 1

    (floor_fd, floor_sd), (floor_mwe, _) = result["floor"]
    ddim = ROWS.index(next(r for r in ROWS if r.name == "ddim η=0" and r.spacing == "leading"))
    assert floor_fd + 3 * floor_sd < result["cells"][ddim, 10].frechet  # DDIM's 10-NFE error is measurable
    assert 0 <= floor_mwe < 0.05
    best = min(cell.frechet for (i, c), cell in result["cells"].items() if c == 10)
    assert best < floor_fd + 3 * floor_sd  # and the best 10-NFE sampler reaches the floor: the metric is sound
    # Paired with the exact ODE endpoint: an ODE solver nears it with more NFE; ancestral sampling does not.
    dpm = ROWS.index(next(r for r in ROWS if r.sampler is sampling.dpm_solver and r.spacing == "logsnr"))
    assert result["cells"][dpm, 10].paired[0] < result["cells"][dpm, 5].paired[0] < result["cells"][0, 5].paired[0]
    assert result["cells"][0, 10].paired[1] > 0.3  # DDPM's fresh noise moves many samples to another mode


# as consistency_mixture.py writes it: its students, one of its ODE baselines and its noise floor
STUDENTS = {
    "schedule": "linear",
    "shape": [3, 8, 8],
    "samples": 5000,
    "iterations": 1200,
    "rows": [
        {"method": "CD", "steps": 1, "nfe": 1, "fd": 2.74, "rms": 0.216, "other_mode": 0.067},
        {"method": "CD", "steps": 2, "nfe": 2, "fd": 2.19, "rms": 0.416, "other_mode": 0.271},
        {"method": "CT", "steps": 1, "nfe": 1, "fd": 74.3, "rms": 0.751, "other_mode": 0.604},
        {"method": "ddim η=0 (leading)", "steps": 10, "nfe": 10, "fd": 0.788, "rms": 0.097, "other_mode": 0.009},
        {"method": "noise floor: exact samples", "steps": 0, "nfe": 0, "fd": 0.0458, "rms": 0.0, "other_mode": 0.0},
    ],
}  # fmt: skip


def test_consistency_json_is_read_as_checked_data_for_its_own_schedule_and_mixture(tmp_path):
    path, data = tmp_path / "c.json", image_mixture()
    assert read_students(path, linear(1000), data) == ([], "")  # absent: nothing said
    path.write_text(json.dumps(STUDENTS))
    assert len(read_students(path, linear(1000), data)[0]) == 5  # nothing named as the table's own: all rows
    students, note = read_students(path, linear(1000), data, ours=OWN_METHODS)
    methods = ["CD", "CD", "CT", "noise floor: exact samples"]  # the ddim baseline is the table's own row
    assert [r["method"] for r in students] == methods and all(r["samples"] == 5000 for r in students)
    assert [r["floor"] for r in students] == [False, False, False, True]
    assert students[1] == STUDENTS["rows"][1] | {"samples": 5000, "floor": False} and "5000 samples per row" in note
    rows, said = read_students(path, cosine(1000), data)
    assert rows == [] and said == ("Consistency students: c.json is for the linear schedule, shape [3, 8, 8] and "
                                   "mixture seed 0, not cosine, [3, 8, 8] and 0: not shown.")  # fmt: skip
    rows, said = read_students(path, linear(1000), image_mixture(image_size=4))
    assert rows == [] and "shape [3, 8, 8]" in said and "[3, 4, 4]" in said
    rows, said = read_students(path, linear(1000), data, seed=1)
    assert rows == [] and "seed 0" in said
    path.write_text(json.dumps(STUDENTS | {"seed": 1}))
    assert len(read_students(path, linear(1000), data, seed=1, ours=OWN_METHODS)[0]) == 4


@pytest.mark.parametrize(
    "broken, message",
    [
        ("not json", "not readable JSON"),
        ("[1, 2]", "top level must be an object"),
        (json.dumps({k: v for k, v in STUDENTS.items() if k != "samples"}), '"samples" must be a int'),
        (json.dumps(STUDENTS | {"shape": [3, 8.5, 8]}), '"shape" must hold positive ints'),
        (json.dumps(STUDENTS | {"schedule": 1}), '"schedule" must be a str'),
        (json.dumps(STUDENTS | {"rows": []}), '"rows" not empty'),
        (json.dumps(STUDENTS | {"rows": ["CD"]}), r"rows\[0\] must be an object"),
        (json.dumps(STUDENTS | {"rows": [STUDENTS["rows"][0] | {"fd": "2.7"}]}), r'rows\[0\]\["fd"\] must be a float'),
        (json.dumps(STUDENTS | {"rows": [STUDENTS["rows"][0] | {"steps": True}]}), r'\["steps"\] must be a int'),
        (json.dumps(STUDENTS | {"rows": [STUDENTS["rows"][0] | {"other_mode": 6.7}]}), "a fraction in"),
        (json.dumps(STUDENTS | {"rows": [STUDENTS["rows"][0] | {"steps": 0, "nfe": 0}]}), "0 and 0 only for a 'noise"),
        (json.dumps(STUDENTS | {"rows": [STUDENTS["rows"][-1] | {"nfe": 1}]}), "a count below 1"),
        (
            '{"schedule": "linear", "shape": [3, 8, 8], "samples": 9, "rows": [{"method": "CD", "steps": 1, "nfe": 1, '
            '"fd": NaN, "rms": 0.1, "other_mode": 0.1}]}',
            r'\["fd"\] must be a float',
        ),
        (json.dumps(STUDENTS | {"rows": [{k: v for k, v in STUDENTS["rows"][0].items() if k != "rms"}]}), '"rms"'),
    ],
)
def test_a_broken_consistency_json_is_named_before_the_long_run(broken, message, tmp_path):
    (tmp_path / "c.json").write_text(broken)
    with pytest.raises(UsageError, match=message):
        read_students(tmp_path / "c.json", linear(1000), image_mixture())
    with pytest.raises(UsageError, match="rerun benchmarks/consistency_mixture.py"):
        main(["--schedule", "linear", "--consistency", str(tmp_path / "c.json"), "--out", str(tmp_path)])
    assert not list(tmp_path.glob("quality_*"))


def save_checkpoint(path, data: dict) -> None:
    model_cfg = dict(in_channels=3, out_channels=3, resolution=8, ch=8, ch_mult=[1, 1], num_res_blocks=1,
                     attn_resolutions=[], dropout=0.0, norm_groups=4)  # fmt: skip
    torch.manual_seed(0)
    state = {f"ema.{k}": v for k, v in UNet(**model_cfg).state_dict().items()}
    config = {
        "model": {"_target_": "diffusion.unet.UNet", **model_cfg},
        "schedule": {"_target_": "diffusion.schedule.linear", "T": 1000},
        "data": data,
    }
    torch.save({"state_dict": state, "config": config, "global_step": 7}, path)


MIXTURE = {"_target_": "diffusion.synthetic.Mixture", "root": "", "num_images": 16, "num_val": 4, "num_modes": 3,
           "image_size": 8, "channels": 3, "batch_size": 4, "num_workers": 0, "seed": 0}  # fmt: skip


def test_checkpoint_mode_writes_the_trained_and_the_exact_tables(tmp_path):
    save_checkpoint(tmp_path / "last.ckpt", MIXTURE)
    argv = ["--checkpoint", str(tmp_path / "last.ckpt"), "--nfe", "3", "--samples", "12", "--batch", "5",
            "--threads", "1", "--gamma-m", "2", "--skip-tuning", str(tmp_path / "none.md")]  # fmt: skip
    results = main([*argv, "--out", str(tmp_path), "--no-plot"])
    trained_md = (tmp_path / "quality_checkpoint_linear.md").read_text()
    params = sum(v.numel() for v in torch.load(tmp_path / "last.ckpt")["state_dict"].values())
    assert f"last.ckpt: UNet of {params / 1e6:.2f}M parameters, EMA weights after 7 training steps" in trained_md
    assert f"Skip-Tuning ρ {SKIP_RHO[0]:g}:{SKIP_RHO[1]:g}: none.md not found" in trained_md
    trained, _ = parse_table(trained_md, [3])
    exact, _ = parse_table((tmp_path / "quality_checkpoint_linear_exact.md").read_text(), [3])
    assert list(trained) == [(r.name, r.spacing) for r in ROWS + DEEPCACHE_ROWS + skip_rows(SKIP_RHO)]
    assert list(exact) == [(r.name, r.spacing) for r in ROWS]  # DeepCache and Skip-Tuning need a UNet
    for row in DEEPCACHE_ROWS:  # NFE per batch of 5 (three batches: 5, 5, 2), full UNet calls as DeepCache plans
        n, official = row.wrap.keywords["interval"], row.wrap.keywords.get("schedule") == "official"
        try:
            full = len(official_steps(3, n, 2, 1.4) if official else uniform_steps(3, n))
        except ValueError:  # the official rule finds no power: a blank cell, said so
            assert trained[row.name, row.spacing] == [None] and f"Blank: {row.name} at 3 NFE" in trained_md
            continue
        assert trained[row.name, row.spacing][0][2:4] == (3, full)
    cells, every = results["quality_checkpoint_linear"]["cells"], ROWS + DEEPCACHE_ROWS + skip_rows(SKIP_RHO)
    assert all(c.nfe == 3 or (every[i].sampler.__name__ in AT_MOST and c.nfe < 3) for (i, _), c in cells.items())
    # The paired comparison: every trained cell against its exact twin (an untrained UNet is far from it).
    assert all(c[0][4] > 0.05 and 0 <= c[0][5] <= 100 for c in trained.values() if c[0])
    assert all(c[0] is None or c[0][4] is None for c in exact.values())


def test_skip_rho_reads_the_sweeps_most_frequent_best(tmp_path):
    sweep = tmp_path / "skip_tuning.md"
    sweep.write_text(
        "### Skip-Tuning\n\n| sampler | NFE | exact predictor | ρ 1:1 (plain) | ρ 1:0.7 | ρ 0.8:0.8 |\n"
        "|---|---|---|---|---|---|\n"
        "| ddim η=0 | 5 | 0.1 · 0% · 1 | 0.3 · 1% · 1 | **0.2 · 1% · 1** | 0.4 · 1% · 1 |\n"
        "| ddim η=0 | 9 | 0.1 · 0% · 1 | **0.3 · 1% · 1** | 0.2 · 1% · 1 | 0.4 · 1% · 1 |\n"
        "| ddim η=0 | 9 | 0.1 · 0% · 1 | **0.3 · 1% · 1** | 0.2 · 1% · 1 | 0.4 · 1% · 1 |\n"
        "| ddim η=0 | 9 | 0.1 · 0% · 1 | **0.3 · 1% · 1** | 0.2 · 1% · 1 | 0.4 · 1% · 1 |\n"
        "| ddim η=0 | 10 | 0.1 · 0% · 1 | 0.3 · 1% · 1 | 0.4 · 1% · 1 | **0.2 · 1% · 1** |\n"
        "| pndm | 10 | 0.1 · 0% · 1 | 0.3 · 1% · 1 | **0.2 · 1% · 1** | 0.4 · 1% · 1 |\n\n"
        "| model | before | after |\n|---|---|---|\n| unet | **1** | 2 |\n"
    )
    why = "best in 2 of 6 rows of skip_tuning.md, the most of any ρ but 1:1 (best in 3)"
    assert skip_rho(sweep) == ((1.0, 0.7), why)
    assert skip_rho(tmp_path / "missing.md")[0] == SKIP_RHO
    sweep.write_text(sweep.read_text().replace("**0.2 · 1% · 1**", "0.2 · 1% · 1"))  # only the plain net wins
    assert skip_rho(sweep) == (SKIP_RHO, "no ρ other than 1:1 was best in skip_tuning.md: the config default")


def test_paired_comparison_of_the_exact_predictor_with_itself_is_zero():
    data, sched = image_mixture(image_size=4, num_modes=3), linear(T=1000)
    names = ("ddpm, σ²=β", "analytic_ddpm", "ddim η=0", "unipc order 3")  # stochastic (seeded alike), Gamma, ODE
    rows = [next(r for r in ROWS if r.name == n) for n in names]
    exact = table(rows, data.model(sched), data, sched, [3], 16, keep=True, gamma_m=4)
    again = table(rows, data.model(sched), data, sched, [3], 16, exact=exact["samples"], gamma_m=4)
    assert "samples" not in again and all(cell.paired == (0.0, 0.0) for cell in again["cells"].values())
    other = table(rows, data.model(sched), data, sched, [3], 16, seed=1, exact=exact["samples"], gamma_m=4)
    assert all(cell.paired[0] > 0.1 for cell in other["cells"].values())  # another x_T: far from the twins
    # Columns are steps by default (as benchmarks/consistency_mixture.py calls it): F-PNDM's 3 steps spend 9 NFE
    pndm = table((Row("pndm", sampling.pndm),), data.model(sched), data, sched, [3], 16)
    assert pndm["cells"][0, 3].nfe == 9 and pndm["cells"][0, 3].steps == 3


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)])
    shapes = {k: v for k, v in MIXTURE.items() if k != "num_modes"}
    save_checkpoint(tmp_path / "shapes.ckpt", {**shapes, "_target_": "diffusion.synthetic.Synthetic"})
    with pytest.raises(UsageError, match="data=mixture"):
        main(["--checkpoint", str(tmp_path / "shapes.ckpt"), "--out", str(tmp_path)])
    save_checkpoint(tmp_path / "big.ckpt", {**MIXTURE, "image_size": 16})
    with pytest.raises(UsageError, match="shape"):
        main(["--checkpoint", str(tmp_path / "big.ckpt"), "--out", str(tmp_path)])
    for argv in (
        ["--nfe", "10,x"],
        ["--nfe", "0"],
        ["--samples", "1"],
        ["--gamma-m", "0"],
        ["--endpoint-tol", "0"],
        ["--checkpoint", "a", "--schedule", "linear"],
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="T=1000"):
        main(["--nfe", "1001", "--schedule", "linear", "--samples", "4", "--out", str(tmp_path), "--no-plot"])


@pytest.mark.parametrize("make", [linear, cosine])
def test_the_exact_endpoint_is_where_converged_log_snr_samplers_land(make):
    """The reference starts where the log-SNR rows start (cosine: t = 995, the grid's cut; not T-1, whose extra
    stretch of pure noise moves samples near a mode boundary to another mode): 100 UniPC-3 steps land on it."""
    sched, data = make(T=1000), image_mixture()
    x_T = torch.randn(400, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = exact_endpoint(data.model(sched), x_T, sched, tol=1e-7)
    ts = timesteps.make("logsnr", 100, sched)
    landed = sampling.unipc(data.model(sched), x_T, sched, ts, order=3)
    assert ts[0] == timesteps.noisiest_usable(sched)
    assert (landed - reference).flatten(1).abs().max() < 1e-3
