"""Strings read from files are data: every OmegaConf resolver form, put into every string of a real checkpoint's
config (and of a real diffusers folder's JSON), through every reader, is refused in one line naming the key; nothing
runs (no marker file), and no environment value reaches a file or the message. The cases are generated: every string
leaf x every form. That each form is live is shown once: OmegaConf resolving it runs the payload or reads the secret.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.mixture_testbed import load_checkpoint
from diffusion.errors import UsageError
from diffusion.io import checkpoints, export
from sample import sample
from train import train

from .conftest import TINY_RUN, compose_config

SECRET_VAR, SECRET = "DIFFUSION_TEST_SECRET", "s3cr3t-4f9a1c-token"
TINY = [*TINY_RUN, "data.image_size=8", "model.ch=8", "model.norm_groups=4", "model.attn_resolutions=[]",
        "trainer.max_steps=2", "callbacks.checkpoints.last_every_n_steps=2",
        "callbacks.samples.every_n_steps=2"]  # fmt: skip
CD = [o for o in TINY if not o.startswith("experiment=")] + ["experiment=cd", "data=synthetic", "model=unet_tiny",
                                                               "callbacks.samples_2.n=4"]  # fmt: skip


def forms(marker: Path) -> dict[str, object]:
    """name -> what replaces a string leaf: every resolver OmegaConf and this project register, nested and escaped."""
    create = f"${{oc.create:{{_target_:diffusion.data.torch.save,obj:1,f:'{marker}'}}}}"
    return {
        "oc.create": create,
        "oc.env": f"${{oc.env:{SECRET_VAR}}}",
        "oc.env with a default": f"${{oc.env:{SECRET_VAR},none}}",
        "oc.decode": f"${{oc.decode:'{{_target_: diffusion.data.torch.save, obj: 1, f: {marker}}}'}}",
        "oc.select": "${oc.select:paths.output_dir,x}",
        "oc.dict.keys": "${oc.dict.keys:paths}",
        "oc.dict.values": "${oc.dict.values:paths}",
        "run_token": "${run_token:}",
        "plain interpolation": "${paths.output_dir}",
        "inside text": f"run-${{oc.env:{SECRET_VAR}}}-x",
        "nested": f"${{oc.select:${{oc.env:{SECRET_VAR}}},x}}",
        "escaped (live once resolved)": f"\\${{oc.env:{SECRET_VAR}}}",
        "double escaped": f"\\\\${{oc.env:{SECRET_VAR}}}",
        "in a list": ["fine", create],
        "in a mapping": {"fine": 1, "payload": create},
        "missing value": "???",
    }


FORMS = list(forms(Path("m")))


def string_leaves(tree, prefix: str = ""):
    """(path, key list) of every string in a nested config, e.g. ("logger.project", ["logger", "project"])."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from ((p, [key, *keys]) for p, keys in string_leaves(value, f"{prefix}{key}."))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from ((p, [i, *keys]) for p, keys in string_leaves(value, f"{prefix[:-1]}[{i}]."))
    elif isinstance(tree, str):
        yield prefix[:-1], []


def replaced(tree, keys: list, value):
    tree = copy.deepcopy(tree)
    node = tree
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return tree


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real checkpoint of train.py (logged with W&B, offline: its logger strings are in the config) and a real
    diffusers folder exported from it; each reader's composed config, to be pointed at the crafted files."""
    root = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        train(compose_config("train", [*TINY, "logger=wandb"], root / "run"))
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    export.export_checkpoint(ckpt, root / "folder")
    return ckpt, root / "folder", checkpoints.load(ckpt)


def leaves_of(config: dict) -> list[tuple[str, list]]:
    found = list(string_leaves(config))
    assert len(found) >= 20, found  # the real config's strings: paths, names, targets, the logger's
    return found


def check_refused(error: BaseException, leaf: str, marker: Path, case: str) -> None:
    """One line naming the leaf's key (its path, e.g. config.logger.project); no payload ran; no secret in it."""
    message = str(error)
    assert isinstance(error, UsageError), (case, repr(error))
    named = re.search(rf"{re.escape(leaf)}(\[\d+\]|\.\w+)? is ", message)  # the leaf, or inside it (a list, a mapping)
    assert "\n" not in message and named, (case, message)
    assert not marker.exists(), f"{case}: the payload ran"
    assert SECRET not in message, case


def assert_no_secret_under(tmp: Path) -> None:
    files = [p for p in tmp.rglob("*") if p.is_file()]
    assert files  # the crafted files at least
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), f"the secret reached {path}"


# ---------------------------------------------------------------- the forms are live


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_live_when_omegaconf_resolves_it(form, tmp_path, monkeypatch):
    """What the readers used to do with a checkpoint's string: put it in a config and resolve it (with Hydra's
    instantiate for the logger): each form runs its payload, reads the secret, another key or fails to be text."""
    from hydra.utils import instantiate

    monkeypatch.setenv(SECRET_VAR, SECRET)
    marker = tmp_path / "ran"
    value = forms(marker)[form]
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "section": {"_target_": "builtins.dict",
                                                                               "value": value}})  # fmt: skip
    import diffusion.cli.runs  # noqa: F401 (registers ${run_token:})

    try:
        built = instantiate(cfg.section)["value"]
    except Exception:  # "???" is missing; some payloads fail after their effect
        built = None
    text = json.dumps(OmegaConf.to_container(built) if OmegaConf.is_config(built) else built, default=str)
    assert marker.exists() or SECRET in text or value == "???" or text != json.dumps(value), (form, text)


# ---------------------------------------------------------------- every leaf x every form x every reader


def _readers(tmp: Path):
    """name -> read(path of a crafted checkpoint): each entry that reads a checkpoint, as a user runs it."""
    sample_cfg = compose_config("sample", ["ckpt=PLACEHOLDER", "n_samples=2", "batch_size=2", "steps=2",
                                           "device=cpu"], tmp / "sample")  # fmt: skip
    fid_cfg = compose_config("sample", ["ckpt=PLACEHOLDER", "n_samples=2", "batch_size=2", "steps=2", "fid=true",
                                        f"fid_stats_dir={tmp / 'stats'}", "device=cpu"], tmp / "fid")  # fmt: skip
    resume_cfg = compose_config("train", [*TINY, "resume=PLACEHOLDER"], tmp / "resumed")
    teacher_cfg = compose_config("train", [*CD, "teacher=PLACEHOLDER"], tmp / "cd")
    return {
        "sample.py ckpt=": reading(sample, sample_cfg, "ckpt"),
        "sample.py fid=true": reading(sample, fid_cfg, "ckpt"),
        "train.py resume=": reading(train, resume_cfg, "resume"),
        "train.py teacher=": reading(train, teacher_cfg, "teacher"),
        "pretrained export": lambda path: export.export_checkpoint(path, tmp / "exported"),
        "benchmarks' loader": lambda path: load_checkpoint(str(path), "cpu"),
    }


def reading(entry, cfg, key: str):
    """read(path): `entry` (sample or train) on a copy of `cfg` whose option `key` is the crafted file."""

    def read(path: Path):
        crafted = copy.deepcopy(cfg)
        crafted[key] = str(path)
        return entry(crafted)

    return read


def test_every_string_of_a_checkpoint_in_every_form_is_refused_by_every_reader(real, tmp_path, monkeypatch):
    """The real config with one string replaced, in a checkpoint that is otherwise a real one too, but for its
    weights (left out: 40 ms of torch.load per case; the readers refuse the config before they look at weights, and
    check_refused sees that it is the crafted string they refuse)."""
    ckpt, _, checkpoint = real
    monkeypatch.setenv(SECRET_VAR, SECRET)
    marker, crafted = tmp_path / "ran", tmp_path / "crafted.ckpt"
    readers = _readers(tmp_path)
    light = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states", "callbacks")}
    cases = 0
    for leaf, keys in leaves_of(checkpoint["config"]):
        for form, value in forms(marker).items():
            torch.save({**light, "state_dict": {}, "config": replaced(checkpoint["config"], keys, value)}, crafted)
            for name, read in readers.items():
                with pytest.raises(UsageError) as error:
                    read(crafted)
                check_refused(error.value, f"config.{leaf}", marker, f"{leaf} x {form} x {name}")
                cases += 1
    assert cases == len(leaves_of(checkpoint["config"])) * len(FORMS) * len(readers)
    assert_no_secret_under(tmp_path)


def test_every_string_of_a_diffusers_folder_in_every_form_is_refused(real, tmp_path, monkeypatch):
    """config.json and scheduler_config.json, through sample.py pretrained= and a CD teacher=DIR."""
    _, folder, _ = real
    monkeypatch.setenv(SECRET_VAR, SECRET)
    marker, crafted = tmp_path / "ran", tmp_path / "crafted"
    shutil.copytree(folder, crafted)
    sample_cfg = compose_config("sample", [f"pretrained={crafted}", "n_samples=2", "batch_size=2", "steps=2",
                                           "device=cpu"], tmp_path / "sample")  # fmt: skip
    teacher_cfg = compose_config("train", [*CD, f"teacher={crafted}"], tmp_path / "cd")
    readers = {"sample.py pretrained=": reading(sample, sample_cfg, "pretrained"),
               "train.py teacher=DIR": reading(train, teacher_cfg, "teacher")}  # fmt: skip
    for name in ("config.json", "scheduler_config.json"):
        original = json.loads((folder / name).read_text())
        original["_name_or_path"] = "google/ddpm-cifar10-32"  # a string diffusers itself writes
        for leaf, keys in string_leaves(original):
            for form, value in forms(marker).items():
                (crafted / name).write_text(json.dumps(replaced(original, keys, value)))
                for reader, read in readers.items():
                    with pytest.raises(UsageError) as error:
                        read(crafted)
                    check_refused(error.value, leaf, marker, f"{name} {leaf} x {form} x {reader}")
        (crafted / name).write_text((folder / name).read_text())
    assert_no_secret_under(tmp_path)
