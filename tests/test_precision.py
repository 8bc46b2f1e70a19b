"""The one decision for a training step's precision, fused optimizer and clipping: every trainer config composes to a
plan, the GPU's choices are the ones a CPU test can take too, and impossible combinations are refused up front."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hydra.utils import instantiate

from diffusion.errors import UsageError
from diffusion.io import checkpoints
from diffusion.schedule import linear
from diffusion.training.module import DiffusionModule
from diffusion.training.precision import PRECISIONS, plan_step, resolve_precision
from train import train

from .conftest import CONF, TINY_RUN, compose_config

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def test_auto_is_full_precision_without_a_gpu():
    assert not torch.cuda.is_available()
    assert resolve_precision("auto", "auto") == resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed" and resolve_precision(32, "cpu") == "32"


def test_auto_is_bf16_mixed_on_a_bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "auto") == resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "gpu") == "32-true"


@pytest.mark.parametrize(
    "precision, accelerator, clip", itertools.product(["auto", *PRECISIONS], ["auto", "cpu", "gpu"], [None, 0, 1.0, 5])
)
def test_every_supported_combination_gives_a_plan(precision, accelerator, clip):
    plan = plan_step({"precision": precision, "accelerator": accelerator}, {"grad_clip": clip}, ADAM)
    assert plan.fused  # Adam has a fused kernel for CUDA and, since torch 2.4, for the CPU: tests walk the GPU path
    assert plan.grad_clip == (float(clip) if clip else None)
    assert plan.device == ("cuda" if accelerator == "gpu" else "cpu")
    assert plan.precision == (resolve_precision(precision, accelerator))


def test_an_optimizer_without_a_fused_kernel_is_not_fused():
    assert not plan_step({"accelerator": "cpu"}, {}, functools.partial(torch.optim.RMSprop, lr=0.1)).fused
    assert not plan_step({"accelerator": "cpu"}, {}, None).fused


@pytest.mark.parametrize(
    "trainer, module, words",
    [
        ({"gradient_clip_val": 1.0}, {}, ["trainer.gradient_clip_val", "module.grad_clip=1.0"]),
        ({"accumulate_grad_batches": 4}, {}, ["accumulate_grad_batches", "data.batch_size"]),
        ({"precision": "fp8"}, {}, ["trainer.precision='fp8'", "bf16-mixed"]),
        ({}, {"grad_clip": -1}, ["module.grad_clip=-1", ">= 0"]),
        ({}, {"grad_clip": "one"}, ["module.grad_clip='one'"]),
        ({}, {"grad_clip": True}, ["module.grad_clip=True"]),
        ({"strategy": "fsdp"}, {}, ["FSDP1", "trainer=fsdp"]),
        ({"strategy": {"_target_": "lightning.pytorch.strategies.FSDPStrategy"}}, {}, ["FSDP1", "trainer=fsdp"]),
    ],
)
def test_impossible_settings_are_refused_with_the_fix(trainer, module, words):
    with pytest.raises(UsageError) as error:
        plan_step({"accelerator": "cpu", **trainer}, module, ADAM)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_config_resolves_and_lightning_accepts_the_plan(trainer, tmp_path):
    """The default clips at 1 (DDPM) through the module: Lightning's own clipping, which crashes with fused Adam under
    bf16-mixed and with FSDP, stays off in every trainer config."""
    cfg = compose_config("train", [f"trainer={trainer}", "logger=none"], tmp_path)
    assert cfg.trainer.get("gradient_clip_val") is None and cfg.module.grad_clip == 1.0
    plan = plan_step(cfg.trainer, cfg.module, instantiate(cfg.optim))
    assert plan.grad_clip == 1.0 and plan.fused


def test_the_bf16_mixed_crash_is_lightnings_clipping_not_ours():
    """What the plan avoids: Lightning's MixedPrecision refuses to clip for a fused optimizer (checked on the CPU,
    where bf16-mixed and fused Adam both run)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        MixedPrecision("bf16-mixed", "cpu").clip_gradients(torch.optim.Adam([p], fused=True), 1.0)


# ---------------------------------------------------------------- the step itself


def module_with_grads(scale: float | None) -> DiffusionModule:
    """A DiffusionModule whose network holds gradients of norm 5 (times `scale`, as a GradScaler leaves them)."""
    net = torch.nn.Linear(3, 4, bias=False)
    net.weight.grad = torch.full_like(net.weight, 5 / net.weight.numel() ** 0.5) * (scale or 1.0)
    module = DiffusionModule(net, linear(10), ADAM, grad_clip=1.0)
    scaler = None if scale is None else type("Scaler", (), {"get_scale": lambda self: scale})()
    plugin = type("Plugin", (), {"scaler": scaler})()
    module._trainer = type("Trainer", (), {"precision_plugin": plugin})()
    return module


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_clipping_returns_the_true_norm_and_clips_the_true_gradient(scale):
    """Under fp16 the gradients still carry the GradScaler's scale: the threshold is scaled alike, so the gradient the
    optimizer sees after unscaling has norm grad_clip, and the logged norm is the unscaled one."""
    module = module_with_grads(scale)
    assert module.clip_and_check().item() == pytest.approx(5.0)
    after = module.model.weight.grad.norm().item() / (scale or 1.0)
    assert after == pytest.approx(1.0, rel=1e-5)


def test_a_nonfinite_gradient_gives_a_nonfinite_norm():
    module = module_with_grads(None)
    module.model.weight.grad[0, 0] = float("nan")
    assert not torch.isfinite(module.clip_and_check())


@pytest.mark.slow
def test_the_settings_a_gpu_resolves_to_train_on_the_cpu(tmp_path):
    """bf16-mixed, fused Adam, clipping at 1, torch.compile and EMA: what `python train.py` resolves to on a bf16 GPU,
    run on the CPU (the inductor compiles C++ here, Triton there; everything above the backend is the same)."""
    cfg = compose_config(
        "train",
        [*TINY_RUN, "trainer.precision=bf16-mixed", "module.compile=true", "trainer.max_steps=3",
         "callbacks.samples.every_n_steps=3", "trainer.val_check_interval=3",
         "module.warmup_steps=1", "module.ema_decay=0.5"],
        tmp_path,
    )  # fmt: skip
    module = train(cfg)
    optimizer = module.optimizers().optimizer
    assert module.trainer.precision == "bf16-mixed" and optimizer.defaults["fused"] and module.grad_clip == 1.0
    assert module.model._compiled_call_impl is not None  # the network really ran compiled
    assert module.global_step == 3 and module.skipped_steps == 0
    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    model, _ = checkpoints.load_model(ckpt, use_ema=True)
    raw, _ = checkpoints.load_model(ckpt, use_ema=False)
    torch.manual_seed(cfg.seed)  # train() seeds just before building the network: this is its starting point
    untrained = instantiate(cfg.model)
    for ema, new in zip(model.parameters(), raw.parameters(), strict=True):
        assert torch.isfinite(ema).all() and torch.isfinite(new).all()
    moved = [not torch.equal(e, o) for e, o in zip(model.parameters(), untrained.parameters(), strict=True)]
    assert all(moved)  # the EMA followed the steps
    assert any(not torch.equal(e, n) for e, n in zip(model.parameters(), raw.parameters(), strict=True))
    assert (tmp_path / "samples" / "step_0000003.png").is_file()
