"""Sharded training (FSDP2): `trainer=cpu_fsdp` runs on two CPU processes the path `trainer=fsdp` takes on GPUs,
and gives the same steps as DDP from the same checkpoint."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from diffusion.io import checkpoints
from diffusion.schedule import linear
from diffusion.training.module import DiffusionModule, ema_update
from diffusion.training.strategies import FSDP, shard_unets, torch_shards_right
from diffusion.unet import ResBlock, UNet

from .conftest import ROOT, TINY_RUN

# Where FSDP is refused (tested below), the sharded runs cannot run; torch 2.6 also cannot shard on CPU processes.
needs_fsdp_torch = pytest.mark.skipif(
    not torch_shards_right(), reason=f"trainer=fsdp refuses torch {torch.__version__} (< 2.9: diffusion/strategies.py)"
)
TINY = [o for o in TINY_RUN if o != "trainer=cpu" and not o.startswith("~")] + ["~callbacks.progress"]
# Four steps, a validation and a kept checkpoint at step 2; clipping below the gradient norm (~0.9), so it acts.
FOUR_STEPS = [
    *TINY,
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "callbacks.checkpoints.last_every_n_steps=2",
    "callbacks.checkpoints.keep_every_n_steps=2",
    "callbacks.samples.every_n_steps=2",
    "module.grad_clip=0.5",
    "module.warmup_steps=1",
    "module.ema_decay=0.9",
    "optim.lr=1e-3",
    "data.num_val=1",  # fewer validation images than ranks: every rank must still get a batch, or DDP hangs
]


def train_script(run_dir: Path, *overrides: str, sweep: bool = False, timeout: float = 300) -> None:
    """python train.py in its own process group; on a hang (a collective one rank never joins) kill all of it.
    With `sweep`, a multirun (`-m`) whose jobs get folders under `run_dir`."""
    # The fault handler: a rank that dies in C++ (no Python traceback) still says where.
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONFAULTHANDLER": "1"}
    where = ["-m", f"hydra.sweep.dir={run_dir}"] if sweep else [f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "train.py", *where, *FOUR_STEPS, *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank Lightning started is in this group too
        out, _ = proc.communicate()
        pytest.fail(f"train.py {' '.join(overrides)} hung for {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, excerpt(out)


def excerpt(out: str) -> str:
    """A failed run's output for the assertion: where a rank crashed in C++ (the fault handler's "Fatal Python
    error" stack, which the other rank's traceback of the broken connection would push out of a plain tail), then
    the tail."""
    crash = out.find("Fatal Python error")
    head = out[crash : crash + 3000] + "\n[...]\n" if crash >= 0 else ""
    return head + out[-3000:]


def metrics(run_dir: Path, name: str) -> dict[int, float]:
    """step -> `name` from the CSV logger's metrics.csv (steps counted from 1)."""
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    return {int(r["step"]) + 1: float(r[name]) for r in csv.DictReader(path.open()) if r.get(name)}


def assert_same_steps(a: Path, b: Path, steps: list[int], rtol: float) -> None:
    for name in ("train/loss", "train/grad_norm"):
        ours, theirs = metrics(a, name), metrics(b, name)
        assert sorted(theirs) == steps, (name, sorted(theirs))
        for step in steps:
            assert theirs[step] == pytest.approx(ours[step], rel=rtol), (name, step)
    x = checkpoints.load(a / "checkpoints" / "last.ckpt")["state_dict"]
    y = checkpoints.load(b / "checkpoints" / "last.ckpt")["state_dict"]
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=rtol, atol=1e-6, msg=key)


# ---------------------------------------------------------------- two processes


@pytest.mark.slow
@needs_fsdp_torch
def test_sharded_run_checkpoints_whole_weights_resumes_and_matches_ddp(tmp_path):
    """Four sharded steps with clipping and EMA; resumed from step 2 sharded, and unsharded under DDP: the same run.

    DDP all-reduces whole gradients, FSDP reduce-scatters shards and computes the clipping norm across them, so
    equal losses, gradient norms and weights mean the sharded step is the data-parallel step. The resumed runs match
    only if every rank got its own random state back (rank 1 drawing rank 0's t and noise would change the step);
    the one validation image shared by two ranks checks that validation cannot stall a multi-process run.

    The two resumes are one Hydra multirun (`-m trainer=cpu_fsdp,cpu_ddp`, a process start fewer), which also checks
    that a sweep of multi-process jobs gives one folder and one logger per job: each job's DDP worker re-runs that
    job alone (diffusion.launch), not the whole sweep."""
    straight = tmp_path / "fsdp"
    train_script(straight, "trainer=cpu_fsdp")
    ckpt = checkpoints.load(straight / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4

    losses, norms = metrics(straight, "train/loss"), metrics(straight, "train/grad_norm")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) and 0 < v < 10 for v in losses.values())
    assert max(norms.values()) > 0.5  # module.grad_clip=0.5 clipped at least one step
    assert sorted(p.name for p in (straight / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]

    # The checkpoint holds whole tensors: a plain, unsharded UNet loads them.
    ema, _ = checkpoints.load_model(ckpt, use_ema=True)
    raw, _ = checkpoints.load_model(ckpt, use_ema=False)
    L.seed_everything(ckpt["config"]["seed"], verbose=False)  # as train.py does just before building the network
    initial = instantiate(ckpt["config"]["model"])
    moved = [(ema.state_dict()[k] - initial.state_dict()[k]).abs().max().item() for k in initial.state_dict()]
    lag = [(ema.state_dict()[k] - raw.state_dict()[k]).abs().max().item() for k in initial.state_dict()]
    assert max(moved) > 1e-4 and max(lag) > 1e-4  # the EMA moved off the start and trails the weights

    kept = straight / "checkpoints" / "step_0000002.ckpt"
    assert checkpoints.load(kept)["global_step"] == 2
    rng = checkpoints.load(kept)["rng_states"]["cpu"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])  # each rank's own state, restored by each rank
    assert len(metrics(straight, "val/loss")) == 2  # validated at steps 2 and 4 with one image for two ranks
    sweep = tmp_path / "resumed"
    train_script(sweep, "trainer=cpu_fsdp,cpu_ddp", f"resume={kept}", sweep=True, timeout=600)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"], jobs  # one folder per job, none from a worker's own sweep
    for job, strategy in zip(jobs, ("FSDP", "ddp"), strict=True):
        trainer = checkpoints.load(job / "checkpoints" / "last.ckpt")["config"]["trainer"]
        assert strategy in str(trainer["strategy"]), trainer  # job 0 resumed sharded, job 1 under DDP
        assert len(list(job.glob("csv/version_*"))) == 1  # one logger, not one per process
    assert_same_steps(straight, jobs[0], [3, 4], rtol=1e-5)
    assert_same_steps(straight, jobs[1], [3, 4], rtol=1e-4)
    assert not (ROOT / "multirun").exists() or not any((ROOT / "multirun").rglob(tmp_path.name))


# ---------------------------------------------------------------- one process


def tiny_module() -> DiffusionModule:
    net = UNet(in_channels=3, out_channels=3, resolution=16, ch=16, ch_mult=(1, 1, 1), num_res_blocks=1,
               attn_resolutions=(16,), dropout=0.0, norm_groups=8)  # fmt: skip
    return DiffusionModule(net, schedule=linear(100), optimizer=torch.optim.Adam)


@needs_fsdp_torch
def test_shard_unets_shards_network_and_ema_alike_and_keeps_them_sharded(tmp_path):
    """Every ResBlock and both UNets become FSDP units; after a no_grad forward (validation, sampling) the
    weights are shards again, so the EMA update lerps matching DTensors (FSDP2 would keep a root's whole)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        module = tiny_module()
        shard_unets(module, init_device_mesh("cpu", (1,)))
        shard_unets(module, init_device_mesh("cpu", (1,)))  # a second call keeps the units it finds
        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 2 * (1 + sum(isinstance(m, ResBlock) for m in module.model.modules()))
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 500])
        with torch.no_grad():
            module.ema(x, t)
            module.model(x, t)
        for net in (module.model, module.ema):
            assert all(isinstance(p, DTensor) for p in net.parameters())
        module.model(x, t).square().mean().backward()
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(1.0)
        ema_update(module.ema, module.model, 0.5)
        for e, p in zip(module.ema.parameters(), module.model.parameters(), strict=True):
            assert isinstance(e, DTensor) and torch.allclose(e.full_tensor(), p.full_tensor() - 0.5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("version", ["2.7.1+cu126", "2.8.0"])
def test_fsdp_on_a_torch_that_shards_wrongly_is_refused_in_one_line(tmp_path, entry_point, monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    code, stderr = entry_point("train.py", f"hydra.run.dir={tmp_path}", *TINY, "trainer=cpu_fsdp")
    assert code == 1 and "Traceback" not in stderr
    (said,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert said.startswith(f"error: trainer=fsdp needs torch >= 2.9 (this is torch {version},")  # not Hydra's wrapping
    assert said.endswith("upgrade torch, or use trainer=ddp")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("version", ["2.9.0a0+git5e8c1f2", "2.9.1", "2.10.0", "3.0.0"])
def test_fsdp_is_built_on_a_torch_that_shards_right(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    assert isinstance(FSDP(), FSDP)
