"""Resume continues the same run: the checkpoint's config is the base, overrides that would change the run are refused,
harmless ones are applied and printed, and a killed save's temporaries are cleaned. Under two processes every rank gets
its own random state back: tests/test_fsdp.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.cli import resume
from diffusion.errors import UsageError
from train import train

from .conftest import TINY_RUN, compose_config
from .test_train import train_losses

NO_EXPERIMENT = [o for o in TINY_RUN if not o.startswith(("experiment=", "model.", "data.", "optim.", "module."))] + [
    "data.num_workers=0"
]


def saved_config(tmp: Path, *overrides: str) -> dict:
    """The config a run composed with TINY_RUN + overrides would store in its checkpoints."""
    return OmegaConf.to_container(compose_config("train", [*TINY_RUN, *overrides], tmp), resolve=True)


def test_forgetting_the_experiment_continues_the_checkpoints_run(tmp_path):
    saved = saved_config(tmp_path / "a", "optim.lr=3e-4", "schedule=cosine")
    cfg = compose_config("train", [*NO_EXPERIMENT, "resume=x.ckpt"], tmp_path / "b")
    assert cfg.model.ch == 128 and cfg.data._target_ == "diffusion.data.CIFAR10"  # today's defaults differ
    notes = resume.continue_run(cfg, saved, [*NO_EXPERIMENT, "resume=x.ckpt"]).notes
    for section in ("model", "schedule", "data", "optim", "module"):
        assert OmegaConf.to_container(cfg[section]) == saved[section], section
    assert cfg.trainer.max_steps == saved["trainer"]["max_steps"]  # not overridden: the run's own value
    assert cfg.callbacks.samples.n == 4 and cfg.run_id == saved["run_id"]
    assert cfg.paths.output_dir == str(tmp_path / "b")  # a new folder: the old one is never written into
    assert any(n.startswith("model.ch: 16 from the checkpoint") for n in notes), notes
    assert any(n.startswith("optim.lr: 0.0003 from the checkpoint") for n in notes), notes


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.ch=32", "model.ch"),
        ("schedule=cosine", "schedule._target_"),
        ("data=mixture", "data._target_"),
        ("optim.lr=1e-3", "optim.lr"),
        ("module.ema_decay=0.5", "module.ema_decay"),
        ("seed=7", "seed"),
        ("experiment=cifar10_ddpm", "model.ch"),
    ],
)
def test_an_override_that_would_change_the_run_is_refused(tmp_path, override, key):
    saved = saved_config(tmp_path / "a")
    overrides = [*NO_EXPERIMENT, override, "resume=x.ckpt"]
    cfg = compose_config("train", overrides, tmp_path / "b")
    with pytest.raises(UsageError) as error:
        resume.continue_run(cfg, saved, overrides)
    assert f"{key}:" in str(error.value) and "without resume=" in str(error.value)


def test_harmless_overrides_are_applied_and_printed(tmp_path):
    saved = saved_config(tmp_path / "a")
    overrides = [*NO_EXPERIMENT, "trainer.max_steps=99", "data.num_workers=3", "logger=none", "resume=x.ckpt"]
    cfg = compose_config("train", overrides, tmp_path / "b")
    notes = resume.continue_run(cfg, saved, overrides).notes
    assert cfg.trainer.max_steps == 99 and cfg.data.num_workers == 3 and not cfg.logger
    assert "trainer.max_steps: 99 (command line; the run had 6)" in notes
    assert "data.num_workers: 3 (command line; the run had 0)" in notes


def test_a_crafted_config_in_the_checkpoint_is_refused_before_anything_is_built(tmp_path):
    marker = tmp_path / "owned"
    saved = saved_config(tmp_path / "a")
    saved["model"] = {"_target_": "diffusion.pretrained.Path.write_text", "self": str(marker), "data": "x"}
    cfg = compose_config("train", [*TINY_RUN, "resume=x.ckpt"], tmp_path / "b")
    with pytest.raises(UsageError, match="model._target_"):
        resume.continue_run(cfg, saved, [])
    saved = saved_config(tmp_path / "a")
    saved["trainer"]["strategy"] = {"_target_": "os.system", "command": f"touch {marker}"}  # a dict: never copied
    resume.continue_run(cfg, saved, [])
    assert "strategy" not in cfg.trainer and not marker.exists()


def test_resume_without_the_experiment_trains_on_like_an_uninterrupted_run(tmp_path):
    straight = train(compose_config("train", TINY_RUN, tmp_path / "straight"))
    train(compose_config("train", [*TINY_RUN, "trainer.max_steps=3"], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    stale = last.parent / f".last.ckpt.{dead_pid()}.tmp"
    live = last.parent / f".last.ckpt.{os.getpid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    resumed = train(
        compose_config("train", [*NO_EXPERIMENT, "trainer.max_steps=6", f"resume={last}"], tmp_path / "resumed")
    )
    assert not stale.exists() and live.exists()  # a killed save's file goes; a running process's stays
    assert resumed.global_step == 6 and resumed.model.ch == 16
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(b) == [4, 5, 6] and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in b)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def dead_pid() -> int:
    """A process id that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_consistency_sections_resume_and_older_checkpoints_lack_them(tmp_path):
    """A CD run's consistency section and teacher come back from its checkpoint; a checkpoint written before
    consistency models (no such keys) resumes as the DDPM run it was; a teacher moved elsewhere may be given again
    (adopt_teacher then checks that its weights are the run's: test_consistency.py), its digest may not."""
    saved = saved_config(tmp_path / "a")
    saved["consistency"] = {"method": "cd", "N": 50, "k": 1, "solver": "ddim", "loss": "l2", "mu": 0.95, "phases": 1,
                            "s0": 10, "s1": 1280}  # fmt: skip
    saved["teacher"] = "teacher.ckpt"
    cfg = compose_config("train", [*NO_EXPERIMENT, "resume=x.ckpt"], tmp_path / "b")
    resume.continue_run(cfg, saved, [*NO_EXPERIMENT, "resume=x.ckpt"])
    assert cfg.consistency.method == "cd" and cfg.teacher == "teacher.ckpt"
    old = {k: v for k, v in saved_config(tmp_path / "c").items() if k not in ("consistency", "teacher")}
    cfg = compose_config("train", [*NO_EXPERIMENT, "resume=x.ckpt"], tmp_path / "d")
    resume.continue_run(cfg, old, [*NO_EXPERIMENT, "resume=x.ckpt"])
    assert cfg.consistency is None and cfg.teacher is None
    saved["teacher_digest"] = "ab" * 32
    moved = [*NO_EXPERIMENT, "resume=x.ckpt", "teacher=other.ckpt"]
    cfg = compose_config("train", moved, tmp_path / "e")
    notes = resume.continue_run(cfg, saved, moved).notes
    assert cfg.teacher == "other.ckpt" and cfg.teacher_digest == "ab" * 32
    assert any(n.startswith("teacher: 'other.ckpt' (command line; the run had 'teacher.ckpt')") for n in notes), notes
    forged = [*moved, f"teacher_digest={'cd' * 32}"]
    cfg = compose_config("train", forged, tmp_path / "f")
    with pytest.raises(UsageError, match="teacher_digest: the run has 'abab"):
        resume.continue_run(cfg, saved, forged)


# ---------------------------------------------------------------- what a checkpoint must hold to resume


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 3-step run of the suite's tiny settings (no progress bar callback, enable_progress_bar=false): last.ckpt."""
    folder = tmp_path_factory.mktemp("run")
    train(compose_config("train", [*TINY_RUN, "trainer.max_steps=3"], folder))
    return folder / "checkpoints" / "last.ckpt"


def test_a_run_resumes_with_its_own_callbacks(run, tmp_path):
    """Resumed with nothing but resume= and a new max_steps: the run had no progress bar (Lightning used to refuse
    the bar today's config adds, as the run's enable_progress_bar=false came back) and keeps its other callbacks."""
    overrides = ["logger=csv", "data.num_workers=0", "trainer.max_steps=6", f"resume={run}"]
    cfg = compose_config("train", overrides, tmp_path)
    module = train(cfg)
    assert module.global_step == 6 and "progress" not in cfg.callbacks and cfg.trainer.enable_progress_bar is False
    assert cfg.callbacks.samples.n == 4  # the run's own values of the callbacks it had
    assert (tmp_path / "samples" / "step_0000006.png").is_file()


def _crafted(run: Path, tmp: Path, change) -> Path:
    checkpoint = torch.load(run, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, tmp / "crafted.ckpt")
    return tmp / "crafted.ckpt"


def _reshape(state: dict) -> None:
    state["ema.conv_in.weight"] = state["ema.conv_in.weight"][:, :1]
    state["model.conv_in.weight"] = state["model.conv_in.weight"][:, :1]


@pytest.mark.parametrize(
    "change, resume_says, sample_says",
    [
        (lambda c: c.pop("loops"), "cannot be resumed: it has no 'loops'", None),
        (lambda c: c.pop("optimizer_states"), "cannot be resumed: it has no 'optimizer_states'", None),
        (lambda c: c["loops"].pop("fit_loop"), "cannot be resumed: it has no 'loops.fit_loop'", None),
        (lambda c: _reshape(c["state_dict"]),
         "weights do not fit this run's model: model.conv_in.weight is [16, 1, 3, 3] there",
         "weights do not fit its model config: conv_in.weight is"),
        (lambda c: [c["state_dict"].pop(f"{p}.conv_out.bias") for p in ("ema", "model")],
         "weights do not fit this run's model: 2 missing (e.g. model.conv_out.bias)",
         "weights do not fit its model config: 1 missing (e.g. conv_out.bias)"),
        (lambda c: c["state_dict"].update({"ema.conv_out.bias": 0.5, "model.conv_out.bias": 0.5}),
         "conv_out.bias is a float, not torch.float32 weights", "conv_out.bias is a float, not torch.float32 weights"),
        (lambda c: c["state_dict"].update({"ema.extra": torch.zeros(1)}), "1 unexpected (e.g. ema.extra)",
         "1 unexpected (e.g. extra)"),
        (lambda c: c["optimizer_states"][0]["state"][0].update(exp_avg=torch.zeros(3)),
         "optimizer state does not fit this run's", None),
        (lambda c: c["optimizer_states"][0]["param_groups"][0]["params"].pop(), "optimizer state does not fit", None),
    ],
)  # fmt: skip
def test_a_checkpoint_that_cannot_continue_the_run_is_refused_in_one_line(run, tmp_path, change, resume_says,
                                                                           sample_says):  # fmt: skip
    """train.py resume= and sample.py read a checkpoint through one loader and say the same thing about its weights,
    in one line, before Lightning (silently at step 0 without `loops`; a page of RuntimeError, or a TypeError)."""
    from sample import sample

    path = _crafted(run, tmp_path, change)
    overrides = ["trainer=cpu", "logger=csv", "data.num_workers=0", "trainer.max_steps=6", f"resume={path}"]
    with pytest.raises(UsageError) as error:
        train(compose_config("train", overrides, tmp_path / "resumed"))
    assert resume_says in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "resumed" / "checkpoints").exists()
    cfg = compose_config("sample", [f"ckpt={path}", "logger=none", "n_samples=2", "steps=2", "device=cpu"], tmp_path)
    if sample_says is None:  # sampling needs only the weights
        assert sample(cfg).shape == (2, 32, 32, 3)
    else:
        with pytest.raises(UsageError, match=re.escape(sample_says)):
            sample(cfg)
