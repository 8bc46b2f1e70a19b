"""benchmarks/quality_vs_steps.py on tiny settings: the table's shape, the NFE each sampler documents, the noise
floor below DDIM's 10-step error, and the checkpoint mode's plumbing (an untrained UNet on data=mixture)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.quality_vs_steps import DEEPCACHE_ROWS, ROWS, image_mixture, main, table
from diffusion.checkpoints import CheckpointError
from diffusion.deepcache import uniform_steps
from diffusion.errors import UsageError
from diffusion.schedule import linear
from diffusion.unet import UNet

CELL = re.compile(r"^([\d.e+-]+) / ([\d.]+) \((\d+)(?:, (\d+) full)?\)(?: · ([\d.]+), ([\d.]+)%)?$")
DOCUMENTED_NFE = {"pndm": lambda s: s + 9, "s_pndm": lambda s: s + 1, "plms": lambda s: s + 1}  # others: s


def parse_table(text: str, steps: list[int]) -> tuple[dict[tuple[str, str], list[tuple]], list[str]]:
    """{(sampler, spacing): [(frechet, mode error, nfe, full, RMS vs exact, % flipped; None where absent) per step
    count]}, and the floor's cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| sampler | spacing | " + " | ".join(f"{s} steps" for s in steps) + " |"
    rows = {}
    for line in lines[2:-1]:
        name, spacing, *cells = (c.strip() for c in line.strip("|").split("|"))
        assert len(cells) == len(steps), line
        parsed = [CELL.match(c) for c in cells]
        assert all(parsed), line
        rows[name, spacing] = [
            (float(m[1]), float(m[2]), int(m[3]), m[4] and int(m[4]), m[5] and float(m[5]), m[6] and float(m[6]))
            for m in parsed
        ]
    floor = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert floor[0] == "noise floor: exact samples" and len(floor) == 2 + len(steps)
    return rows, floor[2:]


def test_closed_form_table_rows_columns_nfe_and_noise_floor(tmp_path):
    steps = [10, 20]
    results = main(["--schedule", "linear", "--steps", "10,20", "--samples", "1500", "--out", str(tmp_path)])
    text = (tmp_path / "quality_linear.md").read_text()
    rows, _ = parse_table(text, steps)
    assert list(rows) == [(r.name, r.spacing) for r in ROWS]
    assert (tmp_path / "quality_linear.png").stat().st_size > 10_000
    assert not (tmp_path / "quality_cosine.md").exists()

    for row in ROWS:
        name = row.sampler.__name__
        nfe = [cell[2] for cell in rows[row.name, row.spacing]]
        assert nfe == [DOCUMENTED_NFE.get(name, lambda s: s)(s) for s in steps], row

    result = results["quality_linear"]
    (floor_fd, floor_sd), (floor_mwe, _) = result["floor"]
    ddim = ROWS.index(next(r for r in ROWS if r.name == "ddim η=0" and r.spacing == "leading"))
    assert floor_fd + 3 * floor_sd < result["cells"][ddim, 10].frechet  # DDIM's 10-step error is measurable
    assert 0 <= floor_mwe < 0.05
    best = min(result["cells"][i, 20].frechet for i in range(len(ROWS)))
    assert best < floor_fd + 3 * floor_sd  # and the best 20-step sampler reaches the floor: the metric is sound


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
    argv = [
        "--checkpoint",
        str(tmp_path / "last.ckpt"),
        "--steps",
        "4",
        "--samples",
        "12",
        "--batch",
        "5",
        "--threads",
        "1",
    ]
    main([*argv, "--out", str(tmp_path), "--no-plot"])
    trained_md = (tmp_path / "quality_checkpoint_linear.md").read_text()
    params = sum(v.numel() for v in torch.load(tmp_path / "last.ckpt")["state_dict"].values())
    assert f"last.ckpt: UNet of {params / 1e6:.2f}M parameters, EMA weights after 7 training steps" in trained_md
    trained, _ = parse_table(trained_md, [4])
    exact, _ = parse_table((tmp_path / "quality_checkpoint_linear_exact.md").read_text(), [4])
    assert list(trained) == [(r.name, r.spacing) for r in ROWS + DEEPCACHE_ROWS]
    assert list(exact) == [(r.name, r.spacing) for r in ROWS]  # DeepCache needs a UNet
    for row in DEEPCACHE_ROWS:  # NFE per batch of 5 (three batches: 5, 5, 2), full UNet calls as DeepCache plans
        (_, _, nfe, full, _, _) = trained[row.name, row.spacing][0]
        assert (nfe, full) == (4, len(uniform_steps(4, row.cache)))
    # The paired comparison: every trained row against its exact twin (an untrained UNet is far from it).
    assert all(cells[0][4] > 0.05 and 0 <= cells[0][5] <= 100 for cells in trained.values())
    assert all(cells[0][4] is None for cells in exact.values())


def test_paired_comparison_of_the_exact_predictor_with_itself_is_zero():
    data, sched = image_mixture(image_size=4, num_modes=3), linear(T=1000)
    rows = ROWS[:3] + ROWS[-1:]  # stochastic (fresh noise, seeded alike) and deterministic samplers
    exact = table(rows, data.model(sched), data, sched, [3], 16, keep=True)
    again = table(rows, data.model(sched), data, sched, [3], 16, exact=exact["samples"])
    assert "samples" not in again and all(cell.paired == (0.0, 0.0) for cell in again["cells"].values())
    other = table(rows, data.model(sched), data, sched, [3], 16, seed=1, exact=exact["samples"])
    assert all(cell.paired[0] > 0.1 for cell in other["cells"].values())  # another x_T: far from the twins


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
        ["--steps", "10,x"],
        ["--steps", "0"],
        ["--samples", "1"],
        ["--checkpoint", "a", "--schedule", "linear"],
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="T=1000"):
        main(["--steps", "1001", "--schedule", "linear", "--samples", "4", "--out", str(tmp_path), "--no-plot"])
