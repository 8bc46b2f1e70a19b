"""On a CUDA GPU, what a GPU run resolves to and the CPU tests cannot reach: training under bf16-mixed with fused
Adam, clipping and EMA (eager and compiled), resuming, every sampler and DeepCache in bf16 against fp32, sample.py
under torchrun, and the FID Inception's features. Skipped without CUDA; `python benchmarks/gpu_report.py` runs
them together with the GPU benchmarks."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion.evaluation import inception
from diffusion.io import checkpoints
from train import train

from .conftest import ROOT, TINY_RUN, compose_config
from .test_fsdp import metrics
from .test_sample import SAMPLERS, draw
from .test_train import train_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); on a GPU machine: pytest -m gpu, or "
        "python benchmarks/gpu_report.py",
    ),
]

GPU_RUN = [o for o in TINY_RUN if not o.startswith("trainer=")] + ["trainer=gpu"]  # the tiny run, GPU defaults
CLIP = 0.05  # far below the tiny UNet's raw gradient norms (0.6 to 1 in its first steps): every step is clipped


class GradNorms(L.Callback):
    """The global gradient norm each optimizer step used: read in a post-step hook, after clipping and before the
    next zero_grad, whichever way the module clips."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = [torch.linalg.vector_norm(g) for g in grads]  # none after a skipped (non-finite) step: nan
        self.norms.append(torch.linalg.vector_norm(torch.stack(norms)).item() if norms else math.nan)


def gpu_config(tmp: Path, *overrides: str):
    """The tiny run on trainer=gpu, clipping at CLIP, with GradNorms watching the optimizer."""
    cfg = compose_config("train", [*GPU_RUN, f"module.grad_clip={CLIP}", *overrides], tmp)
    with open_dict(cfg):
        cfg.callbacks.grad_norms = {"_target_": f"{__name__}.GradNorms"}
    return cfg


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of a - b over the RMS of b: images as floats in [-1, 1], features as they come."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 127.5 - 1


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_gpu_run_trains_in_bf16_with_fused_adam_clipping_and_ema(compile, tmp_path):
    cfg = gpu_config(tmp_path, f"module.compile={str(compile).lower()}", "module.warmup_steps=1")
    module = train(cfg)
    assert module.device.type == "cuda"
    assert module.trainer.precision == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")
    assert module.trainer.optimizers[0].defaults.get("fused") is True
    (spy,) = [c for c in module.trainer.callbacks if type(c).__name__ == "GradNorms"]
    assert len(spy.norms) == 6 and all(0.9 * CLIP < n <= CLIP * 1.001 for n in spy.norms), spy.norms

    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) and 0 < v < 10 for v in losses.values())

    torch.manual_seed(cfg.seed)  # train() builds the network right after seeding: its starting point
    start = instantiate(cfg.model).state_dict()
    moved = {}
    for name in ("model", "ema"):
        state = getattr(module, name).state_dict()
        moved[name] = sum((state[k].float().cpu() - start[k]).norm() ** 2 for k in start) ** 0.5
    assert 0 < moved["ema"] < moved["model"], moved  # the EMA moved, and lags the raw weights

    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    model, _ = checkpoints.load_model(ckpt, device="cuda")
    x, t = torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([0, 999], device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(x, t)).all()


def test_fp16_with_its_grad_scaler_trains_with_fused_adam_and_clipping(tmp_path):
    """16-mixed is the one path the CPU cannot walk (Lightning runs bf16 there instead): the GradScaler's scaled
    gradients are clipped at a scaled threshold and fused Adam unscales them itself. Overflow steps the scaler skips
    are counted as skipped; the run must still end finite, with the clipped norm reported unscaled."""
    module = train(gpu_config(tmp_path, "trainer.precision=16-mixed", "module.warmup_steps=1"))
    assert module.trainer.precision == "16-mixed" and module.trainer.optimizers[0].defaults.get("fused") is True
    assert module.global_step == 6 and module.skipped_steps < 6
    norms = {k: v for k, v in metrics(tmp_path, "train/grad_norm").items() if math.isfinite(v)}
    assert norms and all(0 < v < 1e3 for v in norms.values()), norms  # unscaled: not multiplied by 2**16
    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_resume_on_the_gpu_continues_like_an_uninterrupted_run(tmp_path):
    """Loosely: under bf16 autocast with cuDNN's autotuned kernels two processes need not agree bit for bit, so the
    losses must agree to 2%; a step that drew other t, noise or images would differ by tens of percent (the loss
    of a batch of 8 varies that much from draw to draw)."""
    train(compose_config("train", GPU_RUN, tmp_path / "straight"))
    train(compose_config("train", [*GPU_RUN, "trainer.max_steps=3"], tmp_path / "first"))
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*GPU_RUN, f"resume={first}"], tmp_path / "resumed"))
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=2e-2), step
    a, b = (checkpoints.load(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 6
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    steps = [ckpt["optimizer_states"][0]["state"][0]["step"] for ckpt in (a, b)]
    assert float(steps[0]) == float(steps[1]) == 6


# ---------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory) -> Path:
    """The tiny model trained on the GPU for 40 steps at a high learning rate: its raw weights give samples with
    structure (RMS 0.6 in [-1, 1], a sixth of the pixels clipped), where an untrained one's are nearly all clipped
    and would hide any difference."""
    run_dir = tmp_path_factory.mktemp("gpu-train")
    overrides = ["data.image_size=16", "trainer.max_steps=40", "optim.lr=3e-3", "module.warmup_steps=1"]
    train(compose_config("train", [*GPU_RUN, *overrides], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


# bf16 keeps 8 significant bits, so each network output is off by ~0.4% of its size, and the sampler carries these
# errors to x0. With this model at 30 steps the samples move by 0.8% to 0.9% of their RMS under CPU autocast (the same
# rounding), for every sampler; at 12 steps the 4th-order multistep samplers (pndm, plms) amplify that to 5%, so the
# test takes 30. Samples from another seed differ by 140%; a sampler that rounded its own arithmetic to bf16 or a
# network that lost the timestep would be off by tens of percent. 5% leaves the GPU's kernels 5x room.
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_in_bf16_is_close_to_fp32(sampler, gpu_ckpt, tmp_path):
    common = ["device=cuda", "use_ema=false", "steps=30", "n_samples=8", "batch_size=8", f"sampler={sampler}"]
    fp32 = draw(tmp_path / "fp32", gpu_ckpt, *common, "precision=fp32")
    bf16 = draw(tmp_path / "bf16", gpu_ckpt, *common, "precision=bf16")
    assert not np.array_equal(bf16, fp32)  # autocast ran
    error = relative_rms(as_float(bf16), as_float(fp32))
    assert error < BF16_TOLERANCE, f"{sampler}: bf16 samples differ from fp32 by {error:.3f} of their RMS"


def test_sample_py_under_torchrun_on_one_gpu(gpu_ckpt, tmp_path):
    common = ["logger=none", "use_ema=false", "n_samples=5", "batch_size=2", "steps=4", "sampler=ddpm"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "sample.py", f"ckpt={gpu_ckpt}",
         *common, f"hydra.run.dir={tmp_path / 'torchrun'}"],
        cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert " on cuda" in result.stdout, result.stdout[-2000:]
    images = np.load(tmp_path / "torchrun" / "samples.npz")["arr_0"]
    direct = draw(tmp_path / "direct", gpu_ckpt, *common, "device=cuda")
    assert images.shape == direct.shape == (5, 16, 16, 3)
    assert np.abs(images.astype(int) - direct).max() <= 1  # the same images (up to a rounding step of uint8)


# ---------------------------------------------------------------- FID features


def test_fid_inception_features_on_the_gpu_match_the_cpu(tmp_path, monkeypatch, record_property):
    """The FID Inception on CUDA: the released weights when they are on disk or downloadable, else the same network
    with random weights in the released file's layout (their digest standing in for the released one, as in
    test_inception.py), so the CUDA path (TF's resize, convolutions, pooling) runs either way."""
    try:
        weights, kind = inception.weights_path(timeout=10), "the released weights"
    except inception.WeightsNotFoundError:
        from torchvision.models import inception_v3

        torch.manual_seed(0)
        weights, kind = tmp_path / "random-inception.pth", "random weights (the released ones are not reachable)"
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        torch.save(net.state_dict(), weights)
        monkeypatch.setattr(inception, "WEIGHTS_SHA256", hashlib.sha256(weights.read_bytes()).hexdigest())
    record_property("inception", kind)
    net = inception.Inception(weights)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    options = dict(batch_size=3, extractor=net, progress=False)
    on_gpu = inception.inception_features(images, device="cuda", **options)
    on_cpu = inception.inception_features(images, device="cpu", **options)
    assert on_gpu.shape == (6, 2048) and np.isfinite(on_gpu).all()
    # cuDNN convolutions run in TF32 by default (10-bit mantissa): ~0.1% per layer, well under 2% after ~100 layers
    assert relative_rms(on_gpu, on_cpu) < 2e-2
