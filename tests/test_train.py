"""End to end: train(cfg) on tiny synthetic data writes checkpoints, samples and logs, resumes exactly,
and turns bad input into one clear line. Two processes (DDP, FSDP, a multirun of them): tests/test_fsdp.py."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion.errors import UsageError
from diffusion.io import checkpoints
from diffusion.training.losses import eps_loss
from train import train

from .conftest import ROOT, TINY_RUN, compose_config


def run(tmp: Path, *overrides: str):
    cfg = compose_config("train", [*TINY_RUN, *overrides], tmp)
    return train(cfg), cfg


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV logger's metrics.csv (steps counted from 1)."""
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r.get("train/loss")}


def script(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- one run


def test_a_run_writes_checkpoints_samples_and_metrics(tmp_path, caplog):
    with caplog.at_level("INFO"):
        module, cfg = run(tmp_path)
    assert "weights_only" not in caplog.text  # each save said "`weights_only` was not set, defaulting to `False`."
    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and ckpt["config"]["run_id"] == cfg.run_id
    assert {"model.conv_in.weight", "ema.conv_in.weight"} <= ckpt["state_dict"].keys()
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 10 for v in losses.values())
    metrics = (next(tmp_path.glob("csv/version_*/metrics.csv"))).read_text()
    assert "val/loss" in metrics and "val/loss_ema" in metrics and "train/lr" in metrics


def test_the_optimizer_and_the_checkpoint_get_plain_values_only(tmp_path, monkeypatch):
    """torch 2.6's Adam keeps `betas` as it is given: an OmegaConf ListConfig there went into every checkpoint, and
    torch.load(weights_only=True) refused to read it back. Whatever the torch version, the optimizer is built from
    plain Python and a checkpoint holds tensors and plain Python only."""
    given = {}
    build = torch.optim.Adam.__init__

    def recording(self, params, **kwargs):
        given.update(kwargs)
        build(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", recording)
    run(tmp_path, "trainer.max_steps=1")
    assert given["betas"] == [0.9, 0.999] and {type(v) for v in given.values()} <= {bool, int, float, list}

    def leaves(obj):
        if isinstance(obj, dict):
            yield from (leaf for pair in obj.items() for item in pair for leaf in leaves(item))
        elif isinstance(obj, list | tuple):
            yield from (leaf for item in obj for leaf in leaves(item))
        else:
            yield obj

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    kinds = {type(leaf) for leaf in leaves(ckpt)}
    assert kinds <= {torch.Tensor, str, bool, int, float, type(None)}, kinds


def test_training_lowers_the_loss(tmp_path):
    """40 steps at a high learning rate: the loss on held-out images, at fixed t and noise, must drop."""
    module, cfg = run(
        tmp_path, "trainer.max_steps=40", "optim.lr=3e-3", "module.warmup_steps=1", "callbacks.samples.every_n_steps=99"
    )
    torch.manual_seed(cfg.seed)  # train() builds the network right after seeding: this is its starting point
    untrained = instantiate(cfg.model)
    batch = next(iter(module.trainer.datamodule.val_dataloader()))
    losses = []
    for net in (untrained, module.model):
        with torch.no_grad():
            losses.append(eps_loss(net, module.schedule, batch, generator=torch.Generator().manual_seed(0)).item())
    assert losses[1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------- resume


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    run(tmp_path / "straight")
    run(tmp_path / "first", "trainer.max_steps=3")
    first = checkpoints.load(tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 3
    _, cfg = run(tmp_path / "resumed", f"resume={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert cfg.run_id == first["config"]["run_id"]  # the same W&B run goes on
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
    a = checkpoints.load(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    b = checkpoints.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------- W&B offline


def test_wandb_goes_offline_without_credentials_and_logs_the_loss(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    _, cfg = run(tmp_path, "logger=wandb")
    assert os.environ["WANDB_MODE"] == "offline"
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert run_dir.name.endswith(cfg.run_id)
    log = next(run_dir.glob("*.wandb")).read_bytes()
    assert b"train/loss" in log and b"samples" in log
    assert str(tmp_path / "checkpoints" / "last.ckpt").encode() in log  # the checkpoint path is recorded
    assert b"warmup_steps" in log  # the resolved config


def test_fid_during_training_is_logged(tmp_path, monkeypatch):
    """callbacks.fid.every_n_steps > 0 logs val/fid against the cached training-set statistics (the Inception
    network, whose weights cannot be downloaded here, is swapped for a pixel-statistics stand-in)."""
    from diffusion.training import callbacks

    class Pixels(torch.nn.Module):
        name = "pixel-quadrants"

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)

    monkeypatch.setattr(callbacks, "Inception", Pixels)
    stats_dir = tmp_path / "stats"
    run(tmp_path, "callbacks.fid.every_n_steps=3", "callbacks.fid.n=8", f"callbacks.fid.stats_dir={stats_dir}")
    metrics = (next(tmp_path.glob("csv/version_*/metrics.csv"))).read_text()
    fids = [float(r["val/fid"]) for r in csv.DictReader(metrics.splitlines()) if r.get("val/fid")]
    assert len(fids) == 2 and all(f > 0 for f in fids)
    assert len(list(stats_dir.glob("*.npz"))) == 1


def test_fid_is_off_by_default(tmp_path):
    _, cfg = run(tmp_path, "trainer.max_steps=1")
    assert cfg.callbacks.fid.every_n_steps == 0
    assert "val/fid" not in next(tmp_path.glob("csv/version_*/metrics.csv")).read_text()


def test_the_quickstarts_learning_rate_warms_up_and_decays_to_zero_at_the_last_step(tmp_path):
    """experiment=quickstart's own schedule (module.lr_decay=cosine), through train.py: the logged train/lr rises
    over the warm-up, then falls to 0 at trainer.max_steps."""
    module, _ = run(tmp_path, "module.lr_decay=cosine", "module.warmup_steps=2", "optim.lr=1e-3")
    (path,) = tmp_path.glob("csv/version_*/metrics.csv")
    lrs = [float(r["train/lr"]) for r in csv.DictReader(path.open()) if r.get("train/lr")]
    # logged after each step's schedule update: the rate of the next step, the first the warm-up's top (step 2 of 2)
    assert len(lrs) == 6 and lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5e-4)  # half way down
    assert all(a > b for a, b in zip(lrs[:4], lrs[1:5], strict=True)) and lrs[4] == lrs[5] == 0.0
    assert module.optimizers().param_groups[0]["lr"] == 0.0


# ---------------------------------------------------------------- bad input (multirun under DDP: tests/test_fsdp.py)


def test_unknown_option_is_one_clear_line(tmp_path, entry_point):
    code, stderr = entry_point("train.py", "schedule=cosinee", f"hydra.run.dir={tmp_path}")
    assert code == 1
    assert "Could not find 'schedule/cosinee'" in stderr and "cosine" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0: use a whole number of steps >= 1"),
        ("data.batch_size=0", "data.batch_size=0: use a whole number >= 1"),
        ("optim.lr=-1", "optim: Invalid learning rate: -1"),
        ("optim.betas=[0.9,1.5]", "optim: Invalid beta parameter at index 1: 1.5"),
        ("trainer.max_steps=0", "trainer.max_steps=0: use a whole number >= 1"),
    ],
)
def test_bad_counts_and_optimizer_arguments_are_one_line_before_training(tmp_path, override, message):
    """They used to be a ZeroDivisionError inside Lightning, or torch's ValueError from inside its setup."""
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        train(compose_config("train", [*TINY_RUN, override], tmp_path))
    assert "\n" not in str(error.value) and not (tmp_path / "checkpoints").exists()


def test_missing_dataset_says_where_to_put_it(tmp_path):
    """A real process: `python train.py` to the one line and exit code 1, end to end (the others run in-process)."""
    result = script(
        "train.py",
        "data=cifar10",
        "data.download=false",
        "logger=none",
        "trainer=cpu",
        f"hydra.run.dir={tmp_path}",
        env={"DIFFUSION_DATA": str(tmp_path / "data")},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error:" in result.stderr and str(tmp_path / "data" / "cifar10") in result.stderr
    assert "Traceback" not in result.stderr
