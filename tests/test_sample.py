"""End to end: train the tiny model for a few steps, then sample(cfg) with every sampler config writes a grid and
an .npz of the right shape; images depend only on (seed, i); bad input gives one clear line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from diffusion.errors import UsageError
from sample import sample
from train import train

from .conftest import CONF, ROOT, TINY_RUN, compose_config

SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on 16x16 synthetic images: its checkpoint."""
    run_dir = tmp_path_factory.mktemp("train")
    train(compose_config("train", [*TINY_RUN, "data.image_size=16", "trainer.max_steps=3"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def draw(tmp: Path, ckpt: Path, *overrides: str) -> np.ndarray:
    cfg = compose_config("sample", [f"ckpt={ckpt}", "logger=none", "n_samples=6", "batch_size=4", *overrides], tmp)
    return sample(cfg)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "consistency"])  # that one: test_consistency.py
def test_every_sampler_writes_an_npz_and_a_grid(sampler, ckpt, tmp_path):
    small = ["gamma_M=2"] if sampler.startswith("analytic") else []  # Gamma from 2 images: T x 2 network calls
    images = draw(tmp_path, ckpt, f"sampler={sampler}", "steps=12", "png=true", *small)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], images)
    assert (tmp_path / "grid.png").is_file() and len(list((tmp_path / "images").glob("*.png"))) == 6


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_image_i_depends_only_on_seed_and_i(sampler, ckpt, tmp_path):
    """Batch size 4 (6 = 4 + 2) and batch size 5 give the same images, also for the stochastic DDPM."""
    a = draw(tmp_path / "a", ckpt, f"sampler={sampler}", "steps=5", "batch_size=4")
    b = draw(tmp_path / "b", ckpt, f"sampler={sampler}", "steps=5", "batch_size=5")
    c = draw(tmp_path / "c", ckpt, f"sampler={sampler}", "steps=5", "seed=1")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_deepcache_with_interval_one_is_the_plain_model(ckpt, tmp_path):
    plain = draw(tmp_path / "plain", ckpt, "steps=6")
    cached = draw(tmp_path / "cached", ckpt, "steps=6", "cache=deepcache", "cache.interval=1")
    np.testing.assert_array_equal(plain, cached)


def test_a_pretrained_folder_samples_like_its_checkpoint(ckpt, tmp_path):
    """Export the EMA weights to a diffusers folder, sample from it: the same images as from the checkpoint."""
    from diffusion.io import export

    export.export_checkpoint(ckpt, tmp_path / "folder")
    direct = draw(tmp_path / "direct", ckpt, "steps=4")
    cfg = compose_config("sample", [f"pretrained={tmp_path / 'folder'}", "logger=none", "n_samples=6", "steps=4"],
                         tmp_path / "from-folder")  # fmt: skip
    np.testing.assert_array_equal(sample(cfg), direct)


def test_wandb_records_a_sample_run(ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    draw(tmp_path, ckpt, "steps=3", "logger=wandb")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    log = next(run_dir.glob("*.wandb")).read_bytes()
    assert b"images_per_s" in log and b"nfe" in log
    assert b":\x06sample" in log  # the run record's job_type field (protobuf field 7): "sample"
    assert str(ckpt).encode() in log  # the training run it came from


class PixelFeatures(torch.nn.Module):
    """A stand-in for the Inception network (whose weights cannot be downloaded here): mean colour per quadrant."""

    name = "pixel-quadrants"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def test_fid_is_computed_against_the_training_data_and_recorded(ckpt, tmp_path, monkeypatch):
    from diffusion.evaluation import fid as metrics

    monkeypatch.setattr(metrics, "Inception", PixelFeatures)
    draw(tmp_path / "run", ckpt, "steps=3", "fid=true", f"fid_stats_dir={tmp_path / 'stats'}", "logger=csv")
    record = json.loads((tmp_path / "run" / "fid.json").read_text())
    assert record["n_samples"] == 6 and record["extractor"] == "pixel-quadrants" and record["fid"] > 0
    assert record["n_reference"] == 64  # the tiny run's synthetic training set, cached for the next time
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1
    (metrics_csv,) = (tmp_path / "run" / "csv").rglob("metrics.csv")
    assert "fid" in metrics_csv.read_text().splitlines()[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steps=0"], "steps=0: use a whole number >= 1"),
        (["sampler=consistency"], "sampler=consistency samples consistency models .* is a diffusion model"),
        (["sampler.clip=maybe"], "sampler.clip='maybe': ddim takes true or false"),
        (["sampler=analytic_ddpm", "sampler.noise_cap=-1"], "noise_cap must be 'auto', null or a number"),
        (["sampler=analytic_ddpm", "sampler.noise_cap=x"], "sampler.noise_cap='x': analytic_ddpm takes a number or"),
        (["steps=1001"], "steps=1001 is out of range"),
        (["spacing=random"], "spacing"),
        (["precision=fp8"], "precision"),
        (["sampler.eta=2"], "sampler options: eta must lie in"),
        (["cache=deepcache", "cache.branch=99"], "branch=99 does not exist"),
        (["sampler=pf", "sampler.rtol=2"], "sampler options: rtol=2 must be a number in"),
        (["sampler=pf", "sampler.method=LSODA"], "method='LSODA': choose one of RK45"),
        (["sampler=pf", "cache=deepcache", "cache.count=steps"], "cache options: count=steps .* cache.count=calls"),
        (["sampler=pf", "cache=deepcache", "cache.schedule=official"], "cache options: schedule=official places"),
        (["spacing=analytic_optimal"], "analytic_optimal is Analytic-DPM's optimal trajectory.*analytic_ddpm"),
        (["sampler=analytic_ddpm", "gamma_M=0"], "gamma_M=0: use a whole number >= 1"),
        (["sampler=analytic_ddpm", "gamma_M=65"], "gamma_M=65 exceeds the 64 training images"),
        (["sampler=analytic_ddim", "sampler.eta=1.5"], "sampler options: eta must lie in"),
        (
            ["sampler=analytic_ddpm", "gamma_M=2", "data=cifar10", "data.download=false", "paths.data_dir=/nowhere"],
            "CIFAR-10 is not in /nowhere/cifar10",
        ),
    ],
)
def test_bad_options_say_what_to_change(overrides, message, ckpt, tmp_path):
    with pytest.raises(UsageError, match=message):
        draw(tmp_path / "out", ckpt, *overrides)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_diverged_checkpoint_writes_nothing_and_says_what_to_try(ckpt, tmp_path):
    """NaN EMA weights (the raw ones are fine): refused, not saved as black images; use_ema=false works."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("ema.") and value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    with pytest.raises(UsageError, match=r"6 of 6 images are NaN or infinite.*use_ema=false.*step_XXXXXXX.ckpt"):
        draw(tmp_path / "ema", tmp_path / "diverged.ckpt", "steps=2", "png=true")
    assert not (tmp_path / "ema").exists() or not any((tmp_path / "ema").iterdir())
    assert draw(tmp_path / "raw", tmp_path / "diverged.ckpt", "steps=2", "use_ema=false").shape == (6, 16, 16, 3)


def test_a_folder_with_samples_is_refused_and_overwrite_removes_them_first(ckpt, tmp_path):
    first = draw(tmp_path, ckpt, "steps=2", "png=true")
    with pytest.raises(UsageError, match="already holds samples of another run"):
        draw(tmp_path, ckpt, "steps=2", "seed=1")
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], first)  # untouched
    cfg = compose_config("sample", [f"ckpt={ckpt}", "logger=none", "n_samples=2", "steps=2", "seed=1", "png=true",
                                    "overwrite=true"], tmp_path)  # fmt: skip
    second = sample(cfg)
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], second)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png", "000001.png"]  # no stale PNGs


def test_a_bad_checkpoint_is_one_line(tmp_path, entry_point):
    """The path from the command line to the message (in this process; a real one: tests/test_outputs.py); the kinds
    of bad file (missing, corrupt, foreign, pickled code) are told apart by checkpoints.load: tests/test_training.py."""
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    code, stderr = entry_point("sample.py", f"ckpt={tmp_path / 'corrupt.ckpt'}", f"hydra.run.dir={tmp_path / 'out'}")
    assert code == 1 and "cannot read" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr


def test_unknown_sampler_lists_the_choices(tmp_path, entry_point):
    code, stderr = entry_point("sample.py", "sampler=euler", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "Traceback" not in stderr
    assert all(name in stderr for name in SAMPLERS), stderr


def test_sample_without_ckpt_takes_the_newest_checkpoint(ckpt, tmp_path, monkeypatch):
    older, newer = tmp_path / "outputs" / "a" / "last.ckpt", tmp_path / "outputs" / "b" / "last.ckpt"
    for path in (older, newer):
        path.parent.mkdir(parents=True)
        shutil.copy(ckpt, path)
    os.utime(older, (1, 1))
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("sample", ["logger=none", "n_samples=2", "steps=2"], tmp_path / "out")
    assert sample(cfg).shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_two_processes_split_the_work_and_gather_the_same_images(ckpt, tmp_path):
    common = [f"ckpt={ckpt}", "logger=none", "n_samples=5", "batch_size=2", "steps=4", "sampler=ddpm"]
    single = draw(tmp_path / "single", ckpt, *common[2:])
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sample.py", *common,
         f"hydra.run.dir={tmp_path / 'multi'}"],  # fmt: skip
        cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "multi" / "samples.npz")["arr_0"], single)
    assert not list((tmp_path / "multi").glob(".part-*"))


# -------------------------------------------------------------------- Analytic-DPM
def test_analytic_dpm_computes_gamma_once_beside_the_checkpoint_and_reuses_it(ckpt, tmp_path, capsys):
    """The issue's commands on a checkpoint: Gamma from its own training data, cached beside it (one file per
    weights and M), said when computed; the optimal trajectory from the same Gamma."""
    first = draw(tmp_path / "a", ckpt, "sampler=analytic_ddpm", "steps=10", "gamma_M=3")
    said = capsys.readouterr().out
    assert "computing Gamma (Analytic-DPM) once for this model" in said and str(ckpt.parent) in said
    (cached,) = ckpt.parent.glob("last.ema.gamma.M3.*.npz")
    again = draw(tmp_path / "b", ckpt, "sampler=analytic_ddpm", "steps=10", "gamma_M=3")
    assert "computing Gamma" not in capsys.readouterr().out and list(ckpt.parent.glob("*.gamma.M3.*")) == [cached]
    np.testing.assert_array_equal(first, again)
    draw(tmp_path / "c", ckpt, "sampler=analytic_ddim", "sampler.eta=1", "steps=25", "gamma_M=3")
    draw(tmp_path / "d", ckpt, "sampler=analytic_ddpm", "spacing=analytic_optimal", "steps=10", "gamma_M=3")
    draw(tmp_path / "e", ckpt, "sampler=analytic_ddim", "spacing=even", "steps=10", "gamma_M=3", "use_ema=false")
    assert len(list(ckpt.parent.glob("last.raw.gamma.M3.*.npz"))) == 1  # the raw weights have their own Gamma


def test_analytic_dpm_on_a_pretrained_folder_needs_the_data_named(ckpt, tmp_path):
    from diffusion.io import export

    folder = export.export_checkpoint(ckpt, tmp_path / "folder")
    common = [f"pretrained={folder}", "logger=none", "n_samples=2", "steps=5", "sampler=analytic_ddpm", "gamma_M=2"]
    with pytest.raises(UsageError, match="does not name its dataset.*data=cifar10"):
        sample(compose_config("sample", common, tmp_path / "no-data"))
    images = sample(compose_config("sample", [*common, "data=synthetic", "data.image_size=16"], tmp_path / "ok"))
    assert images.shape == (2, 16, 16, 3) and len(list(Path(folder).glob("analytic.ema.gamma.M2.*.npz"))) == 1


# ---------------------------------------------------------------- long work is never lost to a late error


class Features2048(torch.nn.Module):
    """A stand-in FID extractor of the Inception's width (2048), so that reference statistics can be checked against
    it without the Inception's weights."""

    features, name = 2048, "stand-in-2048"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)[:, :1].repeat(1, 2048) / 255


def _stats(path: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    np.savez(path, mu=mu, sigma=sigma)
    return path


def _never_sample(*args, **kwargs):
    raise AssertionError("no image may be drawn for a run that is refused")


@pytest.mark.parametrize(
    "problem, message",
    [
        ("file", "is a file, not a folder"),
        ("proc", "cannot write into out_dir=/proc/"),
        ("nan", "holds unusable reference statistics: mu or sigma has NaN"),
        ("asymmetric", "holds unusable reference statistics: sigma is not symmetric"),
        ("width", "holds statistics of 64 features, stand-in-2048 gives 2048"),
        ("inception", "the FID Inception weights are missing"),
        ("huge", "n_samples=100000000000 needs"),
    ],
)
def test_what_would_fail_after_sampling_is_refused_before_it(problem, message, ckpt, tmp_path, monkeypatch):
    """Each used to raise after every sample was drawn (a traceback, or a misleading 'another run wrote ...'); the
    huge n_samples was OOM-killed at 22 GB without a word. Now: one line, before the first image."""
    from diffusion.cli import sample_run
    from diffusion.evaluation import fid as metrics
    from diffusion.evaluation import inception

    monkeypatch.setattr(sample_run, "generate", _never_sample)
    monkeypatch.setattr(metrics, "Inception", Features2048)
    eye = np.eye(64)
    out, extra = tmp_path / "out", []
    if problem == "file":
        out.write_text("a file")
    elif problem == "proc":
        out = Path("/proc/diffusion-samples")
    elif problem in ("nan", "asymmetric", "width"):
        mu, sigma = np.zeros(2048 if problem != "width" else 64), np.eye(2048 if problem != "width" else 64)
        mu[0] = np.nan if problem == "nan" else 0
        if problem == "asymmetric":
            sigma[0, 1] = 1.0
        extra = ["fid=true", f"fid_ref={_stats(tmp_path / 'ref.npz', mu, sigma)}"]
    elif problem == "inception":
        monkeypatch.setattr(metrics, "Inception", inception.Inception)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setattr(inception, "_download", lambda *a: (_ for _ in ()).throw(OSError("offline")))
        extra = ["fid=true", f"fid_ref={_stats(tmp_path / 'ref.npz', np.zeros(64), eye)}"]
    else:
        extra = ["n_samples=100000000000"]
    cfg = compose_config("sample", [f"ckpt={ckpt}", "logger=none", "steps=2", *extra], tmp_path)
    with open_dict(cfg):
        cfg.out_dir = str(out)
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        sample(cfg)
    assert "\n" not in str(error.value)


def test_an_error_after_the_samples_are_written_says_where_they_are(ckpt, tmp_path, monkeypatch):
    from diffusion.cli import sample_run

    def broken(*args):
        raise UsageError("the scoring failed")

    monkeypatch.setattr(sample_run, "record_fid", broken)
    monkeypatch.setattr(sample_run.fid, "Inception", Features2048)
    ref = _stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(UsageError, match=r"the scoring failed \(the 6 samples are saved in .*samples.npz"):
        draw(tmp_path / "out", ckpt, "steps=2", "fid=true", f"fid_ref={ref}")
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (6, 16, 16, 3)
