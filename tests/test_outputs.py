"""Run outputs and user errors: every run gets its own folder and temporary files; bad options are one line each
with exit code 1, checked before any model is loaded; real bugs keep their traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import sample as sample_script
import train as train_script
from diffusion import images
from diffusion.cli import runs
from diffusion.cli.options import check_options
from diffusion.errors import UsageError, reported
from diffusion.sampling.generate import Distributed

from .conftest import ROOT, compose_config

# ---------------------------------------------------------------- run folders

COMPOSE = """
from hydra import compose, initialize_config_dir
import diffusion.cli.runs
with initialize_config_dir({conf!r}, version_base="1.3"):
    train = compose("train", return_hydra_config=True).hydra
    sample = compose("sample", return_hydra_config=True).hydra
print(train.run.dir, train.sweep.dir, sample.run.dir)
"""


def compose_run_dirs(**env: str) -> list[subprocess.Popen]:
    """Start a process (a run) that composes conf/train.yaml and conf/sample.yaml and prints their run folders."""
    code = COMPOSE.format(conf=str(ROOT / "conf"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_", "DIFFUSION_RUN"))}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_runs_started_together_get_their_own_folders_and_torchrun_ranks_share_one():
    torchrun = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    procs = [compose_run_dirs(), compose_run_dirs(), compose_run_dirs(**torchrun), compose_run_dirs(**torchrun),
             compose_run_dirs(DIFFUSION_RUN_DIR="/runs/parent")]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    dirs = [out.split() for out, _ in outs]
    pattern = r"{}/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-([0-9a-f]{{6}})"
    tokens = []
    for train_run, sweep, sample_run in dirs[:4]:
        token = re.fullmatch(pattern.format("outputs"), train_run).group(1)  # sortable: the time comes first
        assert re.fullmatch(pattern.format("multirun"), sweep).group(1) == token  # one token per run
        assert re.fullmatch(pattern.format("outputs/samples"), sample_run).group(1) == token
        tokens.append(token)
    assert tokens[0] != tokens[1]  # two runs, even in the same second
    assert tokens[2] == tokens[3] and tokens[2] not in tokens[:2]  # the ranks of one torchrun job agree
    assert dirs[4][0] == "/runs/parent"  # a DDP worker that Lightning starts joins its rank 0's folder


def test_temporary_files_are_unique_per_call_and_removed_on_failure(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(src).name), real_replace(src, dst)))
    x = np.zeros((2, 4, 4, 3), np.uint8)
    images.save_npz(x, tmp_path / "samples.npz")
    images.save_npz(x, tmp_path / "samples.npz")
    assert len(set(renamed)) == 2 and all(str(os.getpid()) in name for name in renamed)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        images.save_npz(x, tmp_path / "other.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left behind


def test_save_npz_can_refuse_to_replace_another_runs_file(tmp_path):
    first, second = np.zeros((1, 2, 2, 3), np.uint8), np.ones((1, 2, 2, 3), np.uint8)
    images.save_npz(first, tmp_path / "samples.npz", replace=False)
    with pytest.raises(FileExistsError):
        images.save_npz(second, tmp_path / "samples.npz", replace=False)
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], first)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


def test_gather_part_files_are_named_by_run(tmp_path):
    a, b = Distributed(), Distributed()
    assert a.part(tmp_path, 1) != b.part(tmp_path, 1)  # two runs in one folder
    assert a.part(tmp_path, 0) != a.part(tmp_path, 1) and a.part(tmp_path, 0).name.startswith(".part-")


def test_an_out_dir_with_samples_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("samples.npz", "grid.png", "fid.json", "images/000000.png", "notes.txt", "images/keep.jpg"):
        (tmp_path / name).write_text("old")
    runs.claim_out_dir(tmp_path / "new")  # a folder without samples is fine
    with pytest.raises(UsageError, match=r"already holds samples of another run.*out_dir=.*overwrite=true"):
        runs.claim_out_dir(tmp_path)
    assert (tmp_path / "samples.npz").exists()  # refused: nothing touched
    runs.claim_out_dir(tmp_path, overwrite=True)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["images", "images/keep.jpg", "notes.txt"]  # only the samples go, not the user's files


# ---------------------------------------------------------------- options


def sample_cfg(tmp_path: Path, *overrides: str):
    return compose_config("sample", ["logger=none", *overrides], tmp_path)


def test_every_bad_option_is_named_with_its_fix_in_one_line(tmp_path):
    check_options(sample_cfg(tmp_path), world_size=1)  # the defaults are fine
    bad = [
        "n_samples=0",
        "batch_size=-1",
        "steps=0",
        "seed=-1",
        "precision=fp8",
        "spacing=random",
        "device=gpu",
        "png=maybe",
        "ckpt=a.ckpt",
        "pretrained=b",
        "+sampler.etta=1",
        "cache=deepcache",
        "+cache.intervall=2",
    ]
    with pytest.raises(UsageError) as error:
        check_options(sample_cfg(tmp_path, *bad), world_size=1)
    message = str(error.value)
    assert "\n" not in message
    for key in ("n_samples=0", "batch_size=-1", "steps=0", "seed=-1", "precision='fp8'", "spacing='random'",
                "device='gpu'", "png='maybe'", "pretrained=", "sampler.etta", "cache.intervall"):  # fmt: skip
        assert key in message, key
    assert "fp32, bf16, fp16" in message and "options are eta, clip" in message and "interval" in message


def test_fewer_samples_than_processes_is_refused_on_every_rank(tmp_path):
    check_options(sample_cfg(tmp_path, "n_samples=2"), world_size=2)
    with pytest.raises(UsageError, match="n_samples=1 is fewer than the 2 processes.*nproc_per_node"):
        check_options(sample_cfg(tmp_path, "n_samples=1"), world_size=2)


def test_bad_options_exit_with_one_line_before_loading_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "sample.py", "n_samples=0", "batch_size=0", "precision=fp8", "steps=-3",
         f"ckpt={tmp_path / 'never-read.ckpt'}", f"hydra.run.dir={tmp_path}"],  # fmt: skip
        cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert all(key in result.stderr for key in ("n_samples=0", "batch_size=0", "precision='fp8'", "steps=-3"))
    assert "never-read.ckpt" not in result.stderr  # checked before the checkpoint is looked for


# ---------------------------------------------------------------- user errors and bugs


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info, reported():
        raise UsageError("no checkpoint at x.ckpt:\n  pass ckpt=PATH")
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: no checkpoint at x.ckpt: pass ckpt=PATH\n"
    with pytest.raises(KeyError), reported():
        {}["a bug"]
    with pytest.raises(ValueError), reported():
        raise ValueError("a bug")
    with pytest.raises(SystemExit), reported(ValueError):  # a CLI that documents ValueError as bad input
        raise ValueError("bad input")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UsageError), reported():
        raise UsageError("shown with its traceback")


def test_a_users_bad_config_is_one_line_but_a_constructors_bug_is_not(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit), reported():
        instantiate({"_target_": "diffusion.sampling.ddim", "etta": 0.5})  # an unknown key of the user's
    assert "unexpected keyword argument 'etta'" in capsys.readouterr().err
    with pytest.raises(SystemExit), reported():
        instantiate({"_target_": "diffusion.sampling.no_such_sampler"})
    with pytest.raises(InstantiationException), reported():
        raise InstantiationException("Error in call to target") from KeyError("a bug in a constructor")


@pytest.mark.parametrize("script, function", [(sample_script, "sample"), (train_script, "train")])
def test_entry_points_report_usage_errors_and_keep_tracebacks(script, function, monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    main = script.main.__wrapped__  # the function under @hydra.main

    def fails(error):
        def run(cfg):
            raise error

        return run

    monkeypatch.setattr(script, function, fails(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):
        main({})
    monkeypatch.setattr(script, function, fails(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main({})
    monkeypatch.setattr(script, function, fails(UsageError("bad input")))
    with pytest.raises(SystemExit) as exit_info:
        main({})
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: bad input\n"
