"""The DDPM UNet: shapes, the paper's parameter counts, the time embedding, init, gradients, and diffusers parity."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from diffusion.io.pretrained import to_diffusers
from diffusion.unet import Attention, ResBlock, UNet, timestep_embedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = dict(
    ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, resolution=32, norm_groups=8
)
SMALL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, resolution=32)
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=32)
CELEBA = dict(ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resolution=64)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturbed(model: UNet, seed: int = 0) -> UNet:
    """The zero-initialised layers make a fresh model output 0 and block gradients; jitter every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def diffusers_unet(
    in_channels=3, out_channels=3, *, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, norm_groups=32
):
    """diffusers' UNet2DModel with the google/ddpm-* settings, for the same layout as UNet(**kwargs)."""
    down = tuple(
        "AttnDownBlock2D" if resolution >> i in attn_resolutions else "DownBlock2D" for i in range(len(ch_mult))
    )
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=num_res_blocks,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        dropout=dropout,
        attention_head_dim=None,  # one head as wide as the channels
        norm_eps=1e-6,
        norm_num_groups=norm_groups,
        freq_shift=1,  # log(1e4) / (half - 1)
        flip_sin_to_cos=False,  # [sin | cos]
        downsample_padding=0,  # TF "SAME" padding on the stride-2 conv
    )


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize(
    "kwargs, size",
    [(TINY, 32), ({**TINY, "resolution": 16}, 16), ({**SMALL, "in_channels": 1, "out_channels": 2}, 32)],
)
def test_output_has_the_input_shape(kwargs, size):
    model = UNet(**kwargs)
    x = torch.randn(2, kwargs.get("in_channels", 3), size, size)
    eps = model(x, torch.tensor([0, 999]))
    assert eps.shape == (2, kwargs.get("out_channels", 3), size, size)


def test_attention_sits_where_the_resolution_says():
    at32, at16 = UNet(**TINY), UNet(**{**TINY, "resolution": 16})
    assert [isinstance(level.attn[0], Attention) for level in at32.down] == [False, True, False]
    assert [isinstance(level.attn[0], Attention) for level in at16.down] == [True, False, False]
    assert [isinstance(level.attn[-1], Attention) for level in at16.up] == [True, False, False]


@pytest.mark.parametrize("kwargs, expected", [(CIFAR10, 35_746_307), (CELEBA, 78_700_803)])
def test_paper_configs_have_the_paper_parameter_counts(kwargs, expected):
    with torch.device("meta"):
        assert n_params(UNet(**kwargs)) == expected


@pytest.mark.parametrize("kwargs", [CIFAR10, CELEBA, TINY, SMALL])
def test_parameter_count_matches_diffusers(kwargs):
    with torch.device("meta"):
        assert n_params(UNet(**kwargs)) == n_params(diffusers_unet(**kwargs))


def test_forward_matches_diffusers_with_the_same_weights():
    ours = perturbed(UNet(**SMALL)).eval()
    theirs = diffusers_unet(**SMALL).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), ours.num_levels), strict=True)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 812])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "file, size, expected",
    [("unet_cifar10.yaml", 32, 35_746_307), ("unet_celeba.yaml", 64, 78_700_803), ("unet_tiny.yaml", 32, None)],
)
def test_model_configs_instantiate(file, size, expected):
    cfg = OmegaConf.create({"data": {"image_size": size, "channels": 3}, "model": OmegaConf.load(CONF / file)})
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model, UNet)
    if expected is not None:
        assert n_params(model) == expected
    else:
        assert 200_000 <= n_params(model) <= 500_000


@pytest.mark.parametrize("size", [16, 32])
def test_tiny_config_runs_at_16_and_32(size):
    cfg = OmegaConf.create(
        {"data": {"image_size": size, "channels": 3}, "model": OmegaConf.load(CONF / "unet_tiny.yaml")}
    )
    model = instantiate(cfg.model)
    assert model(torch.randn(2, 3, size, size), 7).shape == (2, 3, size, size)


# ---------------------------------------------------------------- time embedding and conditioning


def test_timestep_embedding_follows_its_formula():
    dim, half = 128, 64
    assert torch.equal(
        timestep_embedding(torch.zeros(3, dtype=torch.long), dim),
        torch.cat([torch.zeros(3, half), torch.ones(3, half)], 1),
    )
    t = torch.tensor([1, 37, 999])
    emb = timestep_embedding(t, dim)
    freqs = [10000 ** (-k / (half - 1)) for k in range(half)]  # 1 down to 1e-4
    expected = torch.tensor([[math.sin(s * f) for f in freqs] + [math.cos(s * f) for f in freqs] for s in t.tolist()])
    torch.testing.assert_close(emb, expected.float(), rtol=0, atol=2e-4)
    # float32 sin/cos of arguments up to 999 agree to about 1e-4, however the frequencies are computed
    reference = get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(emb, reference, rtol=0, atol=1e-4)


def test_scalar_timesteps_broadcast_over_the_batch():
    model, x = perturbed(UNet(**TINY)).eval(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x, torch.full((3,), 250))
        assert torch.equal(model(x, 250), full)
        assert torch.equal(model(x, torch.tensor(250)), full)


def test_output_depends_on_t_per_sample():
    model = perturbed(UNet(**TINY)).eval()
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        same, different = model(x, torch.tensor([100, 100])), model(x, torch.tensor([100, 900]))
    assert torch.equal(same[0], same[1])
    assert (different[0] - different[1]).abs().mean() > 1e-3 * different.abs().mean()


# ---------------------------------------------------------------- init and gradients


def test_init_zeroes_every_residual_branch_and_the_output():
    model = UNet(**TINY)
    last = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    last += [m.proj for m in model.modules() if isinstance(m, Attention)] + [model.conv_out]
    assert len(last) == 3 + 6 + 2 + 4 + 1  # down, up and mid ResBlocks, 4 attentions, conv_out
    assert all(not m.weight.any() and not m.bias.any() for m in last)
    assert not model(torch.randn(2, 3, 32, 32), 10).any()
    assert model.conv_in.weight.std() > 0 and model.temb[0].weight.std() > 0


def test_gradients_reach_every_parameter():
    model = perturbed(UNet(**SMALL))
    model(torch.randn(2, 3, 32, 32), torch.tensor([5, 500])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


# ---------------------------------------------------------------- memory formats, autocast, DeepCache pieces


def test_channels_last_and_bf16_autocast_agree_with_fp32():
    model, x, t = perturbed(UNet(**TINY)).eval(), torch.randn(2, 3, 32, 32), torch.tensor([3, 600])
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize("i, j", [(i, j) for i in range(3) for j in range(2)])
def test_shallow_pass_around_a_cached_deep_feature_equals_forward(i, j):
    """DeepCache's contract: down[i] block j feeds up[i] block n - 1 - j; the helpers recompose forward exactly."""
    model = perturbed(UNet(**SMALL)).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([40, 41])
    n, width = model.num_res_blocks, model.down[i].res[j].conv2.out_channels
    cached = {}

    def keep_h(module, args):  # the up block's input is [h, skip]: keep h, the deep feature DeepCache caches
        cached.setdefault("h", args[0][:, : args[0].shape[1] - width])

    hook = model.up[i].res[n - 1 - j].register_forward_pre_hook(keep_h)
    with torch.no_grad():
        full = model(x, t)
        hook.remove()
        temb = model.embed(t, x)
        h = model.conv_in(x)
        skips = [h]
        for k in range(i):
            h = model.down_level(k, h, temb, skips)
        model.down_level(i, h, temb, skips, stop=j + 1)
        h = model.up_level(i, cached["h"], temb, skips, start=n - 1 - j)
        for k in reversed(range(i)):
            h = model.up_level(k, h, temb, skips)
        assert not skips
        assert torch.equal(model.head(h), full)


class _Muls(TorchFunctionMode):
    """Counts the multiplications issued while active."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_up_level_multiplies_only_when_rho_is_not_one(rho):
    """Skip-Tuning's rho costs the plain UNet nothing: rho = 1 issues no multiplication and passes each skip as is;
    any other rho scales each popped skip once, and nothing else."""
    model = perturbed(UNet(**SMALL)).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    with torch.no_grad():
        temb, h = model.embed(t, x), model.conv_in(x)
        skips = [h]
        for i in range(model.num_levels):
            h = model.down_level(i, h, temb, skips)
        h, kept = model.mid(h, temb), list(skips)
        inputs = []
        hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.up[-1].res]
        with _Muls() as muls:
            model.up_level(model.num_levels - 1, h, temb, skips, rho=rho)
        for hook in hooks:
            hook.remove()
    blocks = model.num_res_blocks + 1
    assert muls.n == (0 if rho == 1.0 else blocks) and len(inputs) == blocks
    for inp, skip in zip(inputs, reversed(kept[-blocks:]), strict=True):
        assert torch.equal(inp[:, -skip.shape[1] :], skip if rho == 1.0 else rho * skip)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 30}, r"multiple of 2\*\*\(len\(ch_mult\) - 1\) = 8"),
        ({"ch": 48}, r"ch=48 must be a positive multiple of norm_groups=32"),
        ({"ch": 0}, r"ch=0 must be a positive multiple of norm_groups=32"),
        ({"ch": -32}, r"ch=-32 must be a positive multiple"),
        ({"attn_resolutions": (16, 12)}, r"\[12\] never occur.*\[32, 16, 8, 4\]"),
        ({"ch_mult": ()}, r"ch_mult must be a non-empty"),
        ({"num_res_blocks": 0}, r"num_res_blocks must be >= 1"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
        ({"in_channels": 0}, r"in_channels and out_channels must be >= 1"),
    ],
)
def test_bad_arguments_raise_a_helpful_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**CIFAR10, **kwargs})


def test_every_group_norm_uses_norm_groups():
    model = UNet(**{**TINY, "ch": 16, "norm_groups": 4})
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
