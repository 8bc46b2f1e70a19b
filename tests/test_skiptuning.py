"""Skip-Tuning: rho = 1 is the plain UNet bit for bit; hooks show that exactly the skip features are scaled, by the
level's rho; the level formula; DeepCache around it scales its shallow calls too; the config and sample.py; errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from diffusion import sampling, schedule, timesteps
from diffusion.errors import UsageError
from diffusion.unet import UNet
from diffusion.wrappers.deepcache import DeepCache
from diffusion.wrappers.skiptuning import SkipTuning, skip_scales

from .conftest import compose_config
from .test_unet import TINY, diffusers_unet, perturbed

SCHED = schedule.linear(T=1000)
SMALL = dict(
    ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0, resolution=16, norm_groups=8
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> UNet:
    """3 levels of 2 blocks, widths 16 / 32 / 32: skips of two widths, a downsample skip per level but the last."""
    torch.manual_seed(0)
    return perturbed(UNet(**SMALL)).eval().requires_grad_(False)


def noise(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- rho = 1 and the level formula


def test_rho_one_is_the_plain_unet_bit_for_bit(unet):
    x, t = noise(), torch.tensor([999, 3])
    assert torch.equal(SkipTuning(unet, rho_top=1.0, rho_bottom=1.0)(x, t), unet(x, t))
    assert torch.equal(SkipTuning(unet, rho_top=1, rho_bottom=1)(x, 7), unet(x, 7))  # ints, a scalar t


def test_rho_below_one_changes_eps(unet):
    x, t = noise(), torch.tensor([500, 500])
    assert not torch.allclose(SkipTuning(unet, rho_top=1.0, rho_bottom=0.7)(x, t), unet(x, t))


@pytest.mark.parametrize("levels", range(1, 9))
def test_the_level_formula_is_linear_from_top_to_bottom(levels):
    """rho_i = rho_top + (rho_bottom - rho_top) i / (L - 1): the ends exact, equal steps, for a random sweep."""
    rng = random.Random(levels)
    for _ in range(50):
        top, bottom = rng.uniform(0.05, 2.0), rng.uniform(0.05, 2.0)
        if levels == 1:
            assert skip_scales(1, top, top) == [top]
            with pytest.raises(ValueError, match="one level"):
                skip_scales(1, top, bottom)
            continue
        rho = skip_scales(levels, top, bottom)
        assert len(rho) == levels and rho[0] == top and rho[-1] == bottom
        expected = [top + (bottom - top) * i / (levels - 1) for i in range(levels)]
        np.testing.assert_allclose(rho, expected, rtol=1e-14)
        np.testing.assert_allclose(np.diff(rho), (bottom - top) / (levels - 1), rtol=1e-10, atol=1e-15)
    assert skip_scales(levels, 1.0, 1.0) == [1.0] * levels  # exactly 1: multiplies nothing


def test_the_wrapper_takes_the_formula_for_its_unet(unet):
    tuned = SkipTuning(unet, rho_top=0.9, rho_bottom=0.5)
    np.testing.assert_allclose(tuned.rho, [0.9, 0.7, 0.5], rtol=1e-15)
    assert (tuned.rho_top, tuned.rho_bottom) == (0.9, 0.5)
    assert "0.9" in repr(tuned) and "0.5" in repr(tuned)


# ---------------------------------------------------------------- which features are scaled (hooks)


def recorder(model: UNet) -> tuple[list, list]:
    """Hooks on `model`: the skips as pushed (conv_in, each down block's output, each downsample) and, in call order,
    ("h", feature) for every up-path feature (mid, up blocks, upsamples) and ("in", level, input) for every up block."""
    pushed, events = [], []

    def push(module, args, out):
        pushed.append(out)

    def up_path(module, args, out):
        events.append(("h", out))

    handles = [model.conv_in.register_forward_hook(push), model.mid.register_forward_hook(up_path)]
    for level in model.down:
        handles += [attn.register_forward_hook(push) for attn in level.attn]  # attn (or Identity) ends a block
        handles += [level.resample.register_forward_hook(push)] if level.resample is not None else []
    for i, level in enumerate(model.up):
        handles += [attn.register_forward_hook(up_path) for attn in level.attn]
        handles += [level.resample.register_forward_hook(up_path)] if level.resample is not None else []
        for res in level.res:
            handles.append(res.register_forward_pre_hook(lambda m, args, i=i: events.append(("in", i, args[0]))))
    return pushed, events, handles


def check_scaled(pushed: list, events: list, rho: list[float]) -> int:
    """Every up block's input is [h, rho_i * skip]: the skip popped in reverse push order, scaled by its level's
    rho, and h the up path's last feature, unscaled. Returns the number of up blocks checked."""
    h, popped = None, 0
    for event in events:
        if event[0] == "h":
            h = event[1]
            continue
        _, i, inp = event
        popped += 1
        skip = pushed[-popped]
        c = skip.shape[1]
        assert torch.equal(inp[:, -c:], rho[i] * skip if rho[i] != 1.0 else skip), f"up[{i}]'s skip"
        if h is not None:  # (a DeepCache shallow call starts the up path from its cached feature)
            assert torch.equal(inp[:, :-c], h), f"up[{i}]'s h was changed"
    assert popped == len(pushed), "every skip is consumed once"
    return popped


def test_exactly_the_skips_are_scaled_by_their_levels_rho(unet):
    tuned = SkipTuning(unet, rho_top=0.9, rho_bottom=0.5)
    pushed, events, handles = recorder(unet)
    try:
        tuned(noise(), torch.tensor([400, 400]))
    finally:
        for handle in handles:
            handle.remove()
    # conv_in + 3 levels x 2 blocks + 2 downsamples = 9 skips, 3 levels x 3 up blocks
    assert len(pushed) == 9 and check_scaled(pushed, events, tuned.rho) == 9
    levels = [e[1] for e in events if e[0] == "in"]
    assert levels == [2, 2, 2, 1, 1, 1, 0, 0, 0]  # the downsample of level l feeds up[l + 1]: rho at its resolution


# ---------------------------------------------------------------- DeepCache around Skip-Tuning


def test_deepcache_interval_one_is_skip_tuning_alone_bit_for_bit(unet):
    tuned, x = SkipTuning(unet, rho_top=0.95, rho_bottom=0.6), noise(1)
    ts = timesteps.make("leading", 6, SCHED)
    alone = sampling.ddim(tuned, x, SCHED, ts)
    cached = sampling.ddim(DeepCache(tuned, ts, interval=1), x, SCHED, ts)
    assert torch.equal(cached, alone)


@pytest.mark.parametrize("branch", [None, 0, 2])
def test_rho_one_under_deepcache_is_deepcache_alone_bit_for_bit(unet, branch):
    ts, x = timesteps.make("leading", 7, SCHED), noise(2)
    plain = sampling.ddim(DeepCache(unet, ts, interval=3, branch=branch), x, SCHED, ts)
    tuned = sampling.ddim(DeepCache(SkipTuning(unet, 1.0, 1.0), ts, interval=3, branch=branch), x, SCHED, ts)
    assert torch.equal(tuned, plain)


@pytest.mark.parametrize("branch", [None, 0, 2, 4])
def test_deepcache_shallow_calls_use_the_scaled_skips(unet, branch):
    """Interval 3: after the full call, the cached calls run the shallow up blocks on rho_i-scaled skips."""
    tuned = SkipTuning(unet, rho_top=0.8, rho_bottom=0.4)
    ts, x = timesteps.make("leading", 6, SCHED), noise(3)
    cache = DeepCache(tuned, ts, interval=3, branch=branch)
    cache(x, ts[0])  # full
    pushed, events, handles = recorder(unet)
    try:
        eps = cache(x, ts[1])  # shallow
    finally:
        for handle in handles:
            handle.remove()
    assert cache.shallow_calls == 1 and torch.isfinite(eps).all()
    assert 0 < check_scaled(pushed, events, tuned.rho) < 9  # some, not all, up blocks ran
    plain = DeepCache(unet, ts, interval=3, branch=branch)
    plain(x, ts[0])
    assert not torch.allclose(plain(x, ts[1]), eps)


def test_a_whole_trajectory_under_deepcache_runs_with_every_sampler(unet):
    ts = timesteps.make("leading", 5, SCHED)
    for sampler in (sampling.ddim, sampling.pndm, sampling.dpm_solver):
        cache = DeepCache(SkipTuning(unet, 1.0, 0.7), ts, interval=2)
        out = sampler(cache, noise(4), SCHED, ts)
        assert torch.isfinite(out).all() and cache.full_calls >= 3 and cache.shallow_calls >= 2


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0, 0.0, -0.5, math.nan, math.inf, -math.inf, True, "0.8", None])
@pytest.mark.parametrize("name", ["rho_top", "rho_bottom"])
def test_bad_rho_is_refused_by_name(unet, name, value):
    with pytest.raises(ValueError, match=name):
        SkipTuning(unet, **{name: value})


def test_a_model_that_is_not_our_unet_is_refused():
    kwargs = {k: v for k, v in TINY.items()}
    with pytest.raises(ValueError, match="UNet2DModel.*wrap the bare UNet"):
        SkipTuning(diffusers_unet(**kwargs))
    model = UNet(**TINY)
    with pytest.raises(ValueError, match="DeepCache"):
        SkipTuning(DeepCache(model, interval=1))
    with pytest.raises(ValueError, match="Skip-Tuned already"):
        SkipTuning(SkipTuning(model))


# ---------------------------------------------------------------- the config and sample.py


def test_the_config_builds_the_wrapper(unet, tmp_path):
    cfg = compose_config("sample", ["skip=tuning", "skip.rho_bottom=0.7"], tmp_path)
    tuned = instantiate(cfg.skip)(unet)
    assert isinstance(tuned, SkipTuning) and tuned.rho_bottom == 0.7 and tuned.rho_top == cfg.skip.rho_top == 1.0
    assert not compose_config("sample", [], tmp_path).skip  # none by default: sample.py skips the wrapper


@pytest.fixture(scope="module")
def folder(unet, tmp_path_factory):
    """The tiny UNet as a `pretrained=` diffusers folder (pretrained.load gives back our UNet class)."""
    from diffusion.io import export

    return export.export(unet, SCHED, tmp_path_factory.mktemp("folder"))


def draw(tmp_path, folder, *overrides: str) -> np.ndarray:
    from sample import sample

    cfg = compose_config("sample", [f"pretrained={folder}", "logger=none", "n_samples=3", "batch_size=3", "steps=6",
                                    "grid=false", *overrides], tmp_path)  # fmt: skip
    return sample(cfg)


def test_sample_py_with_skip_tuning_and_deepcache(folder, tmp_path):
    plain = draw(tmp_path / "plain", folder)
    one = draw(tmp_path / "one", folder, "skip=tuning", "skip.rho_bottom=1.0", "cache=deepcache", "cache.interval=1")
    np.testing.assert_array_equal(one, plain)
    tuned = draw(tmp_path / "tuned", folder, "sampler=dpm_solver", "spacing=logsnr", "skip=tuning",
                 "skip.rho_bottom=0.5", "cache=deepcache", "cache.interval=2")  # fmt: skip
    assert tuned.shape == plain.shape


@pytest.mark.parametrize(
    "override, message",
    [("+skip.rho_botom=0.8", "skip.rho_botom is not an option of SkipTuning: its options are rho_top, rho_bottom"),
     ("skip.rho_bottom=0", r"^skip options: rho_bottom=0(\.0)? must be finite and > 0"),
     ("skip.rho_top=-1", r"^skip options: rho_top=-1(\.0)? must be finite and > 0"),
     ("cache.interval=0", r"^cache options: .*interval=0 must be an int >= 1")],
)  # fmt: skip
def test_sample_py_names_a_bad_skip_option(folder, tmp_path, override, message):
    """The message names the group whose option is bad, also when both wrappers are on."""
    with pytest.raises(UsageError, match=message):
        draw(tmp_path, folder, "skip=tuning", "cache=deepcache", override)


def test_a_misspelt_skip_option_is_named_when_the_config_composes(tmp_path):
    """Without the +, Hydra itself refuses the key (and suggests the +, which the option check above then names)."""
    with pytest.raises(ConfigCompositionException, match="skip.rho_botom"):
        compose_config("sample", ["skip=tuning", "skip.rho_botom=0.8"], tmp_path)
