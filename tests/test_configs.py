"""Every config file composes and builds its object (the README's and docs' commands: tests/test_docs.py)."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.training.precision import resolve_precision
from diffusion.training.strategies import FSDP, torch_shards_right

from .conftest import CONF, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ("data", "schedule", "model", "optim", "trainer", "logger", "callbacks", "experiment", "sampler"):
        assert options(group), group


@pytest.mark.parametrize("name", options("data"))
def test_data_configs_build_their_datamodule(name, tmp_path):
    overrides = [f"data={name}"] + (["data.root=/some/images"] if name == "folder" else [])
    cfg = compose_config("train", overrides, tmp_path)
    data = instantiate(cfg.data)  # builds nothing on disk until setup()
    assert data.batch_size == cfg.data.batch_size and data.image_size == cfg.data.image_size


@pytest.mark.parametrize("name", options("schedule"))
def test_schedule_configs_build_schedules(name, tmp_path):
    sched = instantiate(compose_config("train", [f"schedule={name}"], tmp_path).schedule)
    assert sched.T == 1000 and sched.alphas_cumprod.dtype == torch.float64
    assert (sched.alphas_cumprod.diff() < 0).all()


@pytest.mark.parametrize("name", [n for n in options("model") if n != "unet_celeba"])
def test_model_configs_build_unets(name, tmp_path):
    cfg = compose_config("train", [f"model={name}", "data=synthetic"], tmp_path)
    model = instantiate(cfg.model)
    x = torch.randn(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert model(x, torch.tensor([3])).shape == x.shape


def test_the_model_follows_the_data_and_celeba_ddpm_takes_the_papers_unet(tmp_path):
    cfg = compose_config("train", ["data=celeba"], tmp_path)
    assert cfg.model.resolution == 64 and cfg.model.in_channels == 3
    cfg = compose_config("train", ["experiment=celeba_ddpm"], tmp_path)
    assert cfg.model.ch_mult == [1, 2, 2, 2, 4] and cfg.model.resolution == 64 and cfg.data.image_size == 64


@pytest.mark.parametrize("name", options("optim"))
def test_optim_configs_build_partial_optimizers(name, tmp_path):
    make = instantiate(compose_config("train", [f"optim={name}"], tmp_path).optim)
    assert make([torch.nn.Parameter(torch.zeros(2))]).defaults["lr"] == 2e-4


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs_compose_and_cpu_ones_build(name, tmp_path):
    cfg = compose_config("train", [f"trainer={name}"], tmp_path)
    assert cfg.trainer.max_steps == 800000 and cfg.trainer.use_distributed_sampler is False
    gpu = cfg.trainer.accelerator == "gpu"  # no GPU here: build the strategy object, not a whole Trainer
    if "fsdp" in name and not torch_shards_right():  # refused below strategies.MIN_TORCH
        with pytest.raises(InstantiationException, match="trainer=fsdp needs torch >= 2.9"):
            instantiate(cfg.trainer.strategy)
    elif gpu and OmegaConf.is_dict(cfg.trainer.get("strategy")):
        assert name != "fsdp" or isinstance(instantiate(cfg.trainer.strategy), FSDP)
    elif not gpu:
        precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        assert instantiate(cfg.trainer, precision=precision).max_steps == 800000


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs_build(name, tmp_path):
    cfg = compose_config("train", [f"logger={name}"], tmp_path)
    logger = instantiate(cfg.logger) if cfg.logger else None
    assert (logger is None) == (name == "none")


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs_compose(name, tmp_path):
    cfg = compose_config("train", [f"experiment={name}"], tmp_path)
    assert cfg.trainer.max_steps > 0 and cfg.model._target_ == "diffusion.unet.UNet"


def test_experiment_presets_override_the_top_level_defaults(tmp_path):
    """train.yaml's own values (module.*) come before the experiment, so a preset's choices win."""
    base = compose_config("train", [], tmp_path)
    quick = compose_config("train", ["experiment=quickstart"], tmp_path)
    preset = OmegaConf.load(CONF / "experiment" / "quickstart.yaml")
    assert quick.module.warmup_steps == preset.module.warmup_steps != base.module.warmup_steps
    assert quick.module.ema_decay == preset.module.ema_decay != base.module.ema_decay
    assert compose_config("train", ["experiment=quickstart", "module.ema_decay=0.9"], tmp_path).module.ema_decay == 0.9


@pytest.mark.parametrize("name", options("sampler"))
def test_sampler_configs_build(name, tmp_path):
    assert callable(instantiate(compose_config("sample", [f"sampler={name}"], tmp_path).sampler))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule=cosinee", "schedule"),
        ("data=imagenet", "data"),
        ("model.chh=3", "chh"),
    ],
)
def test_bad_overrides_name_the_problem(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException, match=message):
        compose_config("train", [override], tmp_path)


def test_unknown_schedule_option_lists_the_choices(tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("train", ["schedule=cosinee"], tmp_path)
    assert "cosine" in str(info.value) and "linear" in str(info.value)


def test_mixture_preset_is_the_run_the_checkpoint_benchmark_measured(tmp_path):
    """experiment=mixture trains what benchmarks/results/quality_checkpoint_linear.md measured (the quickstart's
    settings before the quickstart moved to 16x16 shapes): the tiny UNet, 8000 steps of batch 64 at Adam 2e-4."""
    mixture = compose_config("train", ["experiment=mixture"], tmp_path)
    tiny = compose_config("train", ["model=unet_tiny", "data=mixture"], tmp_path)
    assert mixture.data._target_ == "diffusion.synthetic.Mixture" and mixture.model == tiny.model
    assert (mixture.trainer.max_steps, mixture.data.batch_size, mixture.optim.lr) == (8000, 64, 2e-4)
    assert (mixture.module.warmup_steps, mixture.module.ema_decay, mixture.module.lr_decay) == (100, 0.995, "none")
    assert mixture.schedule._target_.endswith("linear")
