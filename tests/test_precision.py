"""The one decision for a training step's precision, fused optimizer and clipping: every trainer config composes to a
plan, the GPU's choices are the ones a CPU test can take too, and impossible combinations are refused up front."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hydra.utils import instantiate

from diffusion.errors import UsageError
from diffusion.precision import PRECISIONS, plan_step, resolve_precision

from .conftest import CONF, compose_config

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
