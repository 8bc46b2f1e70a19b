"""diffusion.pretrained: diffusers folders into our UNet and back out, checked against diffusers itself."""

import json
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from diffusion.errors import UsageError
from diffusion.io import export, pretrained
from diffusion.schedule import Schedule, cosine, linear, quadratic, sigmoid
from diffusion.training.module import DiffusionModule
from diffusion.unet import Attention, UNet

# google/ddpm-cifar10-32's unet/config.json as published, 4x narrower (GroupNorm groups of 4 channels, as there)
CIFAR10 = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "add_attention": True, "attention_head_dim": None,
    "block_out_channels": [32, 64, 64, 64], "center_input_sample": False, "class_embed_type": None,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 8, "num_class_embeds": None, "out_channels": 3,
    "resnet_time_scale_shift": "default", "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip
# google/ddpm-celebahq-256's six levels (attention on the fifth, 16x16 there) at 32x32 and 1/8 of the width
CELEBAHQ = {
    **CIFAR10, "sample_size": 32, "block_out_channels": [16, 16, 32, 32, 64, 64],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}  # fmt: skip
# attention at two resolutions, one ResBlock per level, 1 channel in and 2 out, a head width equal to the channels
TWO_ATTN = {
    **CIFAR10, "sample_size": 16, "in_channels": 1, "out_channels": 2, "block_out_channels": [16, 32, 32],
    "layers_per_block": 1, "attention_head_dim": 32, "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
}  # fmt: skip
OURS = dict(
    ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16, 8), dropout=0.1, resolution=32, norm_groups=8
)
TOL = 2e-5  # float32; measured about 4e-6 on outputs of size ~1 (the sinusoid frequencies round differently)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Jitter every weight, GroupNorm scales included, so that a misplaced tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def saved(folder, config: dict, scheduler=None) -> UNet2DModel:
    """A diffusers UNet2DModel with random weights, written to `folder` with a scheduler config."""
    theirs = perturbed(UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}))
    theirs.save_pretrained(folder)
    (scheduler or DDPMScheduler()).save_pretrained(folder)
    return theirs


def inputs(config: dict, n: int = 3):
    size, g = config["sample_size"], torch.Generator().manual_seed(1)
    return torch.randn(n, config["in_channels"], size, size, generator=g), torch.tensor([0, 417, 999][:n])


def assert_same_outputs(ours: UNet, theirs: UNet2DModel, config: dict) -> None:
    x, t = inputs(config)
    with torch.no_grad():
        expected, got = theirs(x, t).sample, ours(x, t)
    assert expected.std() > 0.1  # a non-trivial output: every weight counts
    assert (got - expected).abs().max() < TOL


# ---------------------------------------------------------------- diffusers -> ours


@pytest.mark.parametrize("config", [CIFAR10, CELEBAHQ, TWO_ATTN], ids=["cifar10", "celebahq", "two-attn"])
def test_loaded_unet_matches_diffusers(tmp_path, config):
    theirs = saved(tmp_path, config)
    ours, schedule = pretrained.load(tmp_path)
    assert isinstance(ours, UNet) and not ours.training
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert_same_outputs(ours, theirs, config)
    assert torch.equal(schedule.betas, linear(1000).betas)


@pytest.mark.parametrize(
    "config, millions, attention_level",
    [
        ({**CIFAR10, "block_out_channels": [128, 256, 256, 256], "norm_num_groups": 32}, 35.7, 1),
        ({**CELEBAHQ, "block_out_channels": [128, 128, 256, 256, 512, 512], "norm_num_groups": 32, "sample_size": 256},
         114, 4),
    ],
    ids=["cifar10-32", "celebahq-256"],
)  # fmt: skip
def test_published_configs_build_the_papers_models(config, millions, attention_level):
    """The published configs at full size: DDPM's parameter counts (Ho et al. 2020, Sec. 4), attention at 16x16."""
    with torch.device("meta"):
        ours = pretrained.unet_from_config(config)
        theirs = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert round(n / 1e6, 1 if millions < 100 else 0) == millions
    assert [isinstance(level.attn[0], Attention) for level in ours.down].index(True) == attention_level


def test_pipeline_folder_legacy_attention_names_and_pickle_free_bin(tmp_path):
    """The google/ddpm-* layout: unet/ and scheduler/ beside a top-level config of the 2022 format."""
    theirs = saved(tmp_path / "unet", TWO_ATTN, DDIMScheduler(beta_schedule="scaled_linear", beta_end=0.03))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "unet" / "scheduler_config.json").rename(tmp_path / "scheduler" / "scheduler_config.json")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNetModel", "ch": 128}))
    (tmp_path / "scheduler_config.json").write_text('{"_class_name": "GaussianDDPMScheduler", "timesteps": 1000}')
    weights = tmp_path / "unet" / pretrained.WEIGHTS
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers < 0.14
    state = load_file(weights)
    save_file(
        {re.sub(r"\.(to_[qkv]|to_out\.0)\.", lambda m: f".{legacy[m[1]]}.", k): v for k, v in state.items()}, weights
    )
    ours, schedule = pretrained.load(tmp_path)
    assert_same_outputs(ours, theirs, TWO_ATTN)
    assert torch.equal(schedule.betas, quadratic(1000, 1e-4, 0.03).betas)  # scheduler/, not the top-level file

    weights.unlink()
    theirs.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert_same_outputs(pretrained.load(tmp_path)[0], theirs, TWO_ATTN)
    torch.save({"conv_in.weight": Schedule}, tmp_path / "unet" / "diffusion_pytorch_model.bin")  # needs unpickling
    with pytest.raises(UsageError, match=r"holds more than plain tensors.*convert it to .*safetensors"):
        pretrained.load(tmp_path)


# ---------------------------------------------------------------- ours -> diffusers -> ours


def test_export_round_trips_through_our_unet_and_diffusers(tmp_path):
    ours, schedule = perturbed(UNet(**OURS)), cosine(1000)
    export.export(ours, schedule, tmp_path)
    again, schedule_again = pretrained.load(tmp_path)
    assert again.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 999])
    with torch.no_grad():
        assert torch.equal(again(x, t), ours(x, t))
    assert torch.equal(schedule_again.betas, schedule.betas)

    theirs = UNet2DModel.from_pretrained(tmp_path).eval()
    assert theirs.config.dropout == 0.1
    assert_same_outputs(ours, theirs, {"sample_size": 32, "in_channels": 3})
    reference = DDPMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(schedule.alphas_cumprod.float(), reference.alphas_cumprod, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "schedule, name",
    [
        (linear(1000), "linear"),
        (linear(300, 1e-3, 0.05), "linear"),
        (quadratic(200, 1e-4, 0.03), "scaled_linear"),
        (cosine(1000), "squaredcos_cap_v2"),
        (sigmoid(1000), "sigmoid"),
        (sigmoid(1000, 1e-4, 0.03), None),  # diffusers' sigmoid with other ends: written out as trained_betas
        (Schedule(torch.linspace(1e-3, 0.5, 50, dtype=torch.float64) ** 1.5), None),
    ],
)
def test_exported_schedule_round_trips_and_reads_the_same_in_diffusers(schedule, name):
    written = json.loads(json.dumps(export.scheduler_config(schedule)))
    assert written["beta_schedule" if name else "trained_betas"] == (name or schedule.betas.tolist())
    torch.testing.assert_close(pretrained.schedule_from_config(written).betas, schedule.betas, rtol=1e-12, atol=0)
    reference = DDPMScheduler.from_config(written)
    torch.testing.assert_close(schedule.alphas_cumprod.float(), reference.alphas_cumprod, rtol=1e-4, atol=0)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "scheduler, ours",
    [
        (DDPMScheduler(beta_schedule="linear"), "linear"),
        (DDPMScheduler(beta_schedule="scaled_linear", num_train_timesteps=500), "quadratic"),
        (DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "quadratic"),
        (PNDMScheduler(beta_schedule="squaredcos_cap_v2"), "cosine"),
        (DDPMScheduler(beta_schedule="sigmoid", beta_end=0.03), "sigmoid"),
        (DDPMScheduler(trained_betas=[0.01, 0.1, 0.2, 0.5], num_train_timesteps=4), "custom"),
    ],
)
def test_schedule_equals_diffusers(tmp_path, scheduler, ours):
    scheduler.save_config(tmp_path)
    schedule = pretrained.schedule_from_config(json.loads((tmp_path / "scheduler_config.json").read_text()))
    assert schedule.name == ours and schedule.betas.dtype == torch.float64
    torch.testing.assert_close(schedule.betas.float(), scheduler.betas, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-4, atol=0)


def test_the_2022_scheduler_config_of_google_ddpm_cifar10_is_linear():
    published = {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                 "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_large"}  # fmt: skip
    assert torch.equal(pretrained.schedule_from_config(published).betas, linear(1000).betas)


# ---------------------------------------------------------------- what we refuse, and how


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resnet_time_scale_shift": "scale_shift"}, r"resnet_time_scale_shift='scale_shift' is not supported"),
        ({"attention_head_dim": 8}, r"attention_head_dim=8 splits the 64-channel attention into heads"),
        ({"freq_shift": 0}, r"freq_shift=0 is not supported"),
        ({"freq_shift": None}, r"freq_shift=0 is not supported"),  # absent: diffusers' default 0
        ({"flip_sin_to_cos": True}, r"flip_sin_to_cos=True is not supported"),
        ({"act_fn": "gelu"}, r"act_fn='gelu' is not supported"),
        ({"norm_eps": 1e-5}, r"norm_eps=1e-05 is not supported; our UNet has norm_eps=1e-06"),
        ({"class_embed_type": "timestep"}, r"class_embed_type='timestep' is not supported"),
        ({"num_class_embeds": 10}, r"num_class_embeds=10 is not supported"),
        ({"center_input_sample": True}, r"center_input_sample=True is not supported"),
        ({"downsample_padding": 1}, r"downsample_padding=1 is not supported"),
        ({"add_attention": False}, r"add_attention=False is not supported"),
        ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier' is not supported"),
        ({"time_embedding_dim": 64}, r"time_embedding_dim=64.*not supported"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
         r"down_block_types=.*CrossAttnDownBlock2D.*not supported"),
        ({"up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]},
         r"up_block_types=.*ours mirror the down blocks.*not supported"),
        ({"some_new_option": 3}, r"option some_new_option=3 is not supported"),
        ({"_class_name": "UNetModel"}, r"describes a UNetModel, not a UNet2DModel"),
        ({"sample_size": 30}, r"resolution=30 must be a positive multiple of"),
    ],
)  # fmt: skip
def test_unsupported_unet_options_are_named(change, message):
    config = {k: v for k, v in {**CIFAR10, **change}.items() if v is not None or k not in change}
    with pytest.raises(UsageError, match=message):
        pretrained.unet_from_config(config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dropout": "x"}, r"dropout='x' is not a number"),
        ({"layers_per_block": 1.5}, r"layers_per_block=1.5 is not a whole number"),
        ({"block_out_channels": [128, "256"]}, r"block_out_channels=\[128, '256'\] is not a list of whole numbers"),
        ({"down_block_types": [{"a": 1}]}, r"down_block_types=\[\{'a': 1\}\] is not a list of block names"),
        ({"in_channels": True}, r"in_channels=True is not a whole number"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(change, message):
    """They used to reach the UNet's constructor: a TypeError (dropout: "x") or an unhashable list."""
    with pytest.raises(UsageError, match=message):
        pretrained.unet_from_config({**CIFAR10, **change})


def test_a_folder_that_asks_for_more_than_its_weights_is_refused_before_allocating(tmp_path):
    """Widths of 200,000 in config.json beside small weights: the network is built on the meta device and checked
    against the weights first (it was a 640 GB allocation); JSON nested 100,000 deep is one line (RecursionError)."""
    saved(tmp_path, TWO_ATTN)
    huge = {**TWO_ATTN, "block_out_channels": [200_000, 400_000, 400_000], "attention_head_dim": None}
    (tmp_path / "config.json").write_text(json.dumps(huge))
    with pytest.raises(
        UsageError, match=r"do not fit .*config.json: temb.0.weight is \[64, 16\] there, \[800000, 200000\] here"
    ):
        pretrained.load(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match=r"config.json nests too deep to be a diffusers config"):
        pretrained.load(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**TWO_ATTN, "deep": "[" * 34 + "]" * 34}).replace('"[', "[").replace(']"', "]")
    )
    with pytest.raises(UsageError, match=r"nests 32 levels deep"):
        pretrained.load(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_type": "flow_prediction"}, r"prediction_type='flow_prediction' is not supported; ours: epsilon"),
        ({"beta_schedule": "laplace"}, r"beta_schedule='laplace' is not supported; choose one of linear, scaled_l"),
        ({"rescale_betas_zero_snr": "yes"}, r"rescale_betas_zero_snr='yes' is not true or false"),
        ({"_class_name": "EulerDiscreteScheduler"}, r"_class_name='EulerDiscreteScheduler' is not supported"),
        ({"trained_betas": [0.1, 0.2]}, r"trained_betas has 2 values but num_train_timesteps=1000"),
    ],
)
def test_unsupported_scheduler_options_are_named(change, message):
    with pytest.raises(UsageError, match=message):
        pretrained.schedule_from_config({**DDPMScheduler().config, **change})


def test_missing_or_broken_folders_say_what_to_do(tmp_path):
    how = r"hf download google/ddpm-cifar10-32 --local-dir"
    with pytest.raises(UsageError, match=rf"no diffusers model folder at .*nowhere: .*{how}"):
        pretrained.load(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=rf"has no config.json.*{how}"):
        pretrained.load(tmp_path)
    saved(tmp_path, TWO_ATTN)
    (tmp_path / "scheduler_config.json").unlink()
    with pytest.raises(UsageError, match=r"has no scheduler_config.json.*noise schedule"):
        pretrained.load(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TWO_ATTN, "layers_per_block": 2}))
    with pytest.raises(UsageError, match=r"lacks down_blocks.0.resnets.1.norm1.weight: the weights do not match"):
        pretrained.load(tmp_path)
    (tmp_path / pretrained.WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match=r"cannot read .*diffusion_pytorch_model.safetensors"):
        pretrained.load(tmp_path)
    (tmp_path / pretrained.WEIGHTS).unlink()
    with pytest.raises(UsageError, match=rf"has no diffusion_pytorch_model.safetensors.*{how}"):
        pretrained.load(tmp_path)


# ---------------------------------------------------------------- our checkpoints, from the command line


def test_export_command_writes_a_checkpoints_ema_weights(tmp_path, capsys):
    model_cfg = {"_target_": "diffusion.unet.UNet", **OURS, "ch_mult": [1, 2, 2], "attn_resolutions": [16, 8]}
    config = {"model": model_cfg, "schedule": {"_target_": "diffusion.schedule.cosine", "T": 100}}
    module = DiffusionModule(UNet(**OURS), cosine(100), optimizer=None, config=config)
    perturbed(module.model, seed=1)
    perturbed(module.ema, seed=2)
    torch.save({"state_dict": module.state_dict(), "config": config}, tmp_path / "last.ckpt")

    for flags, source in [([], module.ema), (["--raw"], module.model)]:
        export.main([str(tmp_path / "last.ckpt"), str(tmp_path / "out"), *flags])
        assert "weights of" in capsys.readouterr().out
        model, schedule = pretrained.load(tmp_path / "out")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())
        assert torch.equal(schedule.betas, cosine(100).betas)

    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: no checkpoint at") and err.count("\n") == 1
    assert "missing.ckpt" in err


# ---------------------------------------------------------------- what the network predicts


def diffusers_ddim(unet: UNet2DModel, scheduler: DDIMScheduler, x: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' own DDIM loop (eta = 0, leading timesteps as ours)."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


SQUARE = {**TWO_ATTN, "out_channels": 1}  # out as in: a network that samples


@pytest.mark.parametrize("prediction_type, ours", [("v_prediction", "v"), ("sample", "x0")])
def test_a_v_or_x0_folder_samples_here_as_in_diffusers_and_exports_back(prediction_type, ours, tmp_path):
    """A diffusers UNet2DModel trained for v (or x0) samples here as diffusers' DDIMScheduler samples it; exported
    from here, diffusers reads the prediction_type back and samples it alike."""
    from diffusion.sampling import ddim
    from diffusion.timesteps import leading
    from diffusion.wrappers.prediction import Prediction

    theirs = saved(tmp_path / "in", SQUARE, DDIMScheduler(prediction_type=prediction_type))
    model, schedule = pretrained.load(tmp_path / "in")
    assert isinstance(model, Prediction) and model.prediction == ours
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    unclipped = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)  # our ddim's default, as DDIM's code
    expected = diffusers_ddim(theirs.eval(), unclipped, x, 10)
    got = ddim(model, x, schedule, leading(10, 1000))
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()

    export.export(model, schedule, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == prediction_type
    back = UNet2DModel.from_pretrained(tmp_path / "out").eval()
    again = diffusers_ddim(back, DDIMScheduler.from_pretrained(tmp_path / "out", clip_sample=False), x, 10)
    assert torch.allclose(again, got, atol=2e-4), (again - got).abs().max()


def test_a_zero_terminal_snr_folder_reads_as_diffusers_rescales_it(tmp_path):
    """rescale_betas_zero_snr: the same Lin et al. rescaling as diffusers' (its alpha_bar to float32 precision, the
    last beta 1), and our export of such a schedule reads back unchanged in both."""
    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           rescale_betas_zero_snr=True, prediction_type="v_prediction")  # fmt: skip
    ours = pretrained.schedule_from_config(dict(theirs.config))
    assert ours.zero_terminal and float(ours.betas[-1]) == 1.0
    # alpha_bar to diffusers' float32 precision (its betas are ratios of them, rounded), 0 at T-1 in both
    assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, atol=2e-7)
    assert float(ours.alphas_cumprod[-1]) == 0 == float(theirs.alphas_cumprod[-1])
    written = export.scheduler_config(ours, "v")
    assert written["prediction_type"] == "v_prediction"
    assert torch.equal(pretrained.schedule_from_config(written).betas, ours.betas)
    assert torch.allclose(DDPMScheduler.from_config(written).betas.double(), ours.betas, atol=1e-7)


def test_a_class_conditional_unet_is_refused_by_the_export_in_one_line(tmp_path):
    net = UNet(3, 3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, num_classes=10)
    with pytest.raises(UsageError, match="class-conditional .* does not map to UNet2DModel's num_class_embeds") as e:
        export.export(net, linear(1000), tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
