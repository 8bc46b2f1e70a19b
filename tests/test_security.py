"""Nothing read from a file is code. Crafted checkpoints and data configs go through every entry that builds from
one (checkpoints.load_model, sample.py's FID reference, mixture_testbed's loader, the diffusers export): each is
refused with the offending key named, and its payload (creating a marker file) never runs. The payloads are shown
to be live: Hydra's instantiate, which the loaders used to call, runs them. Genuine checkpoints of the real configs
still load."""

from __future__ import annotations

import functools
import importlib
import re
import shlex
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.mixture_testbed import load_checkpoint
from diffusion.errors import UsageError
from diffusion.evaluation import fid as metrics
from diffusion.images import save_npz
from diffusion.io import checkpoints, export, registry
from diffusion.unet import UNet

from .conftest import CONF, TINY_RUN, compose_config

MODEL = {"_target_": "diffusion.unet.UNet", "in_channels": 3, "out_channels": 3, "resolution": 8, "ch": 8,
         "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "norm_groups": 4}  # fmt: skip
SCHEDULE = {"_target_": "diffusion.schedule.linear", "T": 100, "beta_start": 1e-4, "beta_end": 0.02}
DATA = {"_target_": "diffusion.synthetic.Synthetic", "root": "", "num_images": 8, "num_val": 2, "image_size": 8,
        "channels": 3, "batch_size": 4, "num_workers": 0, "hflip": True, "seed": 0}  # fmt: skip
GOOD = {"model": MODEL, "schedule": SCHEDULE, "data": DATA}
ARGUMENT = {"model": "ch", "schedule": "T", "data": "num_images"}  # a real parameter to put a bad value in


def attacks(marker: Path, section: str) -> dict[str, tuple[dict, str, str | None]]:
    """name -> (a crafted `section` config, the key its error must name, the resolver that runs its payload: "import
    path" for the one metrics._datamodule had, "hydra" for Hydra's instantiate, which load_model and mixture_testbed
    called, None where this Hydra's own blocklist stops it too)."""
    shell = f"touch {shlex.quote(str(marker))}"
    writer = {"_target_": "diffusion.data.torch.save", "obj": 1, "f": str(marker)}  # torch, as data.py imports it
    good, arg = GOOD[section], ARGUMENT[section]
    return {
        "subprocess.run": ({"_target_": "subprocess.run", "args": shell, "shell": True}, "_target_", "import path"),
        "os.system": ({"_target_": "os.system", "command": shell}, "_target_", "import path"),
        "builtins.open": ({"_target_": "builtins.open", "file": str(marker), "mode": "w"}, "_target_", "import path"),
        "builtins.eval": ({"_target_": "builtins.eval", "_args_": [f"open({str(marker)!r}, 'w')"]}, "_target_", None),
        "method path in the package": (
            {
                "_target_": "diffusion.io.pretrained.Path.write_text",
                "data": "x",
                "self": {"_target_": "diffusion.io.pretrained.Path", "_args_": [str(marker)]},
            },
            "_target_",
            "hydra",
        ),  # fmt: skip
        "re-exported os": ({"_target_": "diffusion.checkpoints.os.system", "command": shell}, "_target_", None),
        "re-exported torch.save": (writer, "_target_", "hydra"),
        "nested target": ({**good, arg: writer}, arg, "hydra"),
        "nested target in a list": ({**good, arg: [writer]}, f"{arg}[0]", "hydra"),
        "_args_": ({**good, "_args_": [writer]}, "_args_", "hydra"),
        "_partial_": ({**good, "_partial_": True}, "_partial_", None),
        "_recursive_": ({**good, "_recursive_": False}, "_recursive_", None),
        "_convert_": ({**good, "_convert_": "all"}, "_convert_", None),
        "unknown key": ({**good, "payload": shell}, "payload", None),
        "dict value": ({**good, arg: OrderedDict(value=8)}, arg, None),
        "tensor value": ({**good, arg: torch.tensor(8)}, arg, None),
        "bytes value": ({**good, arg: b"8"}, arg, None),
        "set value": ({**good, arg: {8}}, arg, None),
        "string in a nested list": ({**good, arg: [["8"]]}, f"{arg}[0][0]", None),
        "no _target_": ({k: v for k, v in good.items() if k != "_target_"}, "_target_", None),
    }


NAMES = list(attacks(Path("m"), "model"))
LIVE = [(name, live) for name, (_, _, live) in attacks(Path("m"), "model").items() if live]


@functools.cache
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = UNet(**{k: v for k, v in MODEL.items() if k != "_target_"}).state_dict()
    return {f"{prefix}.{k}": v for prefix in ("model", "ema") for k, v in state.items()}


def save(path: Path, **sections) -> Path:
    """A checkpoint as train.py writes it: a tiny real UNet's weights (raw and EMA) and a config, crafted or not."""
    torch.save({"state_dict": weights(), "config": {**GOOD, **sections}, "global_step": 3}, path)
    return path


def refused(error: pytest.ExceptionInfo, section: str, key: str) -> None:
    assert isinstance(error.value, UsageError)
    assert f"{section}.{key}" in str(error.value), str(error.value)


# ---------------------------------------------------------------- the payloads are real


@pytest.mark.parametrize("name, resolver", LIVE)
def test_the_payloads_run_under_the_old_resolvers(name, resolver, tmp_path):
    """What the loaders used to do with a config from a file: every payload marked live creates its marker."""
    marker = tmp_path / "ran"
    config, _, _ = attacks(marker, "model")[name]
    try:
        if resolver == "hydra":
            instantiate(config)
        else:  # metrics._datamodule before the registry: import the module, take the attribute, call it
            kwargs = dict(config)
            module, _, attribute = kwargs.pop("_target_").rpartition(".")
            getattr(importlib.import_module(module), attribute)(**kwargs)
    except Exception:  # some fail after their effect (UNet(ch=None)): the harm is done by then
        pass
    assert marker.exists()


# ---------------------------------------------------------------- every entry refuses every variant


@pytest.mark.parametrize("section", ["model", "schedule"])
@pytest.mark.parametrize("name", NAMES)
def test_load_model_refuses_and_runs_nothing(name, section, tmp_path):
    marker = tmp_path / "ran"
    config, key, _ = attacks(marker, section)[name]
    with pytest.raises(registry.UnsafeConfigError) as error:  # a non-plain value already when the file is read
        checkpoints.load_model(checkpoints.load(save(tmp_path / "evil.ckpt", **{section: config})))
    refused(error, section, key)
    assert not marker.exists()


@pytest.mark.parametrize("name", NAMES)
def test_fid_reference_refuses_and_runs_nothing(name, tmp_path):
    """sample.py fid=true hands the checkpoint's data config to fid_from_npz as the reference."""
    marker = tmp_path / "ran"
    config, key, _ = attacks(marker, "data")[name]
    save_npz(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "samples.npz")
    with pytest.raises(registry.UnsafeConfigError) as error:
        metrics.fid_from_npz(tmp_path / "samples.npz", config, cache_dir=tmp_path, extractor=_fail, device="cpu")
    refused(error, "data", key)
    assert not marker.exists()


def _fail(x):
    raise AssertionError("no features should be computed for a refused reference")


@pytest.mark.parametrize("section", ["model", "data"])
@pytest.mark.parametrize("name", NAMES)
def test_quality_benchmark_loader_refuses_and_runs_nothing(name, section, tmp_path):
    marker = tmp_path / "ran"
    config, key, _ = attacks(marker, section)[name]
    path = save(tmp_path / "evil.ckpt", **{section: config})
    with pytest.raises(registry.UnsafeConfigError) as error:
        load_checkpoint(str(path), "cpu")
    refused(error, section, key)
    assert not marker.exists()


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_export_refuses_and_runs_nothing(name, tmp_path, capsys):
    marker = tmp_path / "ran"
    config, key, _ = attacks(marker, "model")[name]
    path = save(tmp_path / "evil.ckpt", model=config)
    with pytest.raises(SystemExit) as stop:
        export.main([str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert f"model.{key}" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sample_with_fid_refuses_a_checkpoints_crafted_data_config(tmp_path, monkeypatch):
    """End to end through sample.py: the model and schedule are genuine, the data section runs a shell command."""
    from sample import sample

    marker = tmp_path / "ran"
    config, _, _ = attacks(marker, "data")["subprocess.run"]
    path = save(tmp_path / "evil.ckpt", data=config)
    monkeypatch.setattr(metrics, "Inception", lambda: _fail)
    overrides = [f"ckpt={path}", "logger=none", "n_samples=2", "batch_size=2", "steps=1", "fid=true",
                 f"fid_stats_dir={tmp_path / 'stats'}", "device=cpu"]  # fmt: skip
    with pytest.raises(registry.UnsafeConfigError, match=re.escape("data._target_='subprocess.run' is not one of")):
        sample(compose_config("sample", overrides, tmp_path / "run"))
    assert not marker.exists()


# ---------------------------------------------------------------- the registry itself


def test_messages_name_the_key_the_choices_and_the_parameters():
    with pytest.raises(registry.UnsafeConfigError) as error:
        registry.build("model", {"_target_": "os.system"}, where="checkpoint config model")
    assert str(error.value).startswith(
        "checkpoint config model._target_='os.system' is not one of: diffusion.unet.UNet"
    )
    with pytest.raises(registry.UnsafeConfigError) as error:
        registry.check("schedule", {**SCHEDULE, "steps": 10, "warp": 2})
    assert "schedule.steps, schedule.warp" in str(error.value) and "takes T, beta_start, beta_end" in str(error.value)
    with pytest.raises(registry.UnsafeConfigError, match="data lacks root, which diffusion.data.ImageFolder needs"):
        registry.check("data", {"_target_": "diffusion.data.ImageFolder", "image_size": 8})
    with pytest.raises(registry.UnsafeConfigError, match=r"optim._partial_"):  # an optimizer is always a partial
        registry.check("optim", {"_target_": "torch.optim.Adam", "_partial_": False})
    with pytest.raises(registry.UnsafeConfigError, match=r"optim.params: not a parameter"):  # the module passes them
        registry.check("optim", {"_target_": "torch.optim.Adam", "params": []})
    with pytest.raises(UsageError, match="cannot build model"):  # the builder's own checks, as a usage error
        registry.build("model", {**MODEL, "norm_groups": 3})
    with pytest.raises(ValueError, match="unknown kind"):  # a programming error, not a user's
        registry.check("sampler", {"_target_": "diffusion.sampling.ddim"})


def test_every_conf_target_is_registered_with_its_parameters(tmp_path):
    """Each option of conf/{model,schedule,data,optim} passes check() with exactly its own keys as arguments (one
    composition sets an option of every group at once)."""
    kinds = {
        kind: sorted(p.stem for p in (CONF / kind).glob("*.yaml")) for kind in ("model", "schedule", "data", "optim")
    }
    checked = set()
    for i in range(max(map(len, kinds.values()))):
        choice = {kind: options[i % len(options)] for kind, options in kinds.items()}
        extra = ["data.root=/images"] if choice["data"] == "folder" else []
        cfg = compose_config("train", [*(f"{k}={v}" for k, v in choice.items()), *extra], tmp_path)
        for kind, option in choice.items():
            config = OmegaConf.to_container(cfg[kind], resolve=True)
            kwargs = registry.check(kind, config, where=f"conf/{kind}/{option}.yaml")
            assert kwargs == {k: v for k, v in config.items() if not k.startswith("_")}
            checked.add((kind, option))
    assert checked == {(kind, option) for kind, options in kinds.items() for option in options}


def test_a_genuine_checkpoint_of_the_real_configs_loads(tmp_path):
    """The quickstart's composed config, saved as train.py saves it: the same weights and schedule come back, and its
    data and optimizer sections build through the registry as Hydra builds them."""
    cfg = compose_config("train", [*TINY_RUN, "data.image_size=16"], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(1)
    net = instantiate(cfg.model)
    state = {f"{p}.{k}": v for p in ("model", "ema") for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "config": config}, tmp_path / "last.ckpt")

    model, schedule = checkpoints.load_model(checkpoints.load(tmp_path / "last.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values(), strict=True))
    assert torch.equal(schedule.betas, instantiate(cfg.schedule).betas)
    data = metrics._datamodule(config["data"])
    assert (type(data), data.image_size, data.num_images) == (type(instantiate(cfg.data)), 16, 64)
    optimizer = registry.build("optim", config["optim"])(model.parameters())
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == cfg.optim.lr
