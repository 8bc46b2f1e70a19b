"""A diverging run loses nothing: a non-finite step changes no weight, EMA or optimizer state and is counted; a run
that keeps diverging stops with a message; a checkpoint is never written with non-finite weights."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from diffusion.io import checkpoints
from diffusion.training import module as training
from diffusion.training.module import DiffusionModule, DivergenceError
from train import train

from .conftest import TINY_RUN, compose_config


def run(tmp: Path, *overrides: str):
    return train(compose_config("train", [*TINY_RUN, "callbacks.samples.every_n_steps=99", *overrides], tmp))


def nan_at(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None) -> None:
    """Make the training loss NaN at the given training calls (counted from 1); validation is not counted."""
    calls = [0]
    loss = training.diffusion_loss

    def diffusion_loss(*args, **kwargs):
        value = loss(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation
            return value
        calls[0] += 1
        bad = calls[0] in (bad_calls or set()) or (from_call is not None and calls[0] >= from_call)
        return value * float("nan") if bad else value

    monkeypatch.setattr(training, "diffusion_loss", diffusion_loss)


def state(module: DiffusionModule) -> dict[str, torch.Tensor]:
    """Every number a step may change: weights, EMA, optimizer moments and step counts, the learning rate."""
    tensors = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in module.ema.state_dict().items()}
    optimizer = module.optimizers().optimizer
    for i, s in enumerate(optimizer.state.values()):
        tensors |= {f"adam{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    tensors["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    nan_at(monkeypatch, bad_calls={4})
    changed = {}
    step = DiffusionModule.training_step

    def spy(self, batch, batch_idx):
        before = state(self)
        out = step(self, batch, batch_idx)
        after = state(self)
        changed[self.global_step] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        return out

    monkeypatch.setattr(DiffusionModule, "training_step", spy)
    module = run(tmp_path)
    assert changed[4] == [], changed[4]  # the NaN step touched nothing
    for good in (3, 5, 6):  # the others move weights, EMA and Adam (the first step has no Adam state before it)
        assert any(k.startswith("model.") for k in changed[good]) and any(k.startswith("ema.") for k in changed[good])
        assert any(k.startswith("adam") for k in changed[good])
    assert module.global_step == 6 and module.skipped_steps == 1 and module.bad_in_a_row == 0
    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["skipped_steps"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    rows = list(csv.DictReader(next(tmp_path.glob("csv/version_*/metrics.csv")).open()))
    skipped = {int(r["step"]) + 1: float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    norms = {int(r["step"]) + 1: float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}
    assert not torch.isfinite(torch.tensor(norms[4])) and all(torch.isfinite(torch.tensor(norms[s])) for s in (1, 5))


def test_a_run_that_keeps_diverging_stops_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, from_call=3)
    with pytest.raises(DivergenceError) as error:
        run(tmp_path, "trainer.max_steps=20", "module.max_bad_steps=3")
    message = str(error.value)
    assert "non-finite for 3 steps in a row" in message and "up to step 5" in message
    assert "optim.lr" in message and "resume=" in message
    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3  # the periodic save before the run stopped; it holds step 2's finite weights
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nonfinite_weights_never_replace_a_checkpoint(tmp_path, monkeypatch):
    """Weights that turn non-finite without a non-finite gradient (here: the EMA, from step 4) are not saved: last.ckpt
    keeps step 3."""
    update = training.ema_update

    def poisoned(ema, model, decay):
        update(ema, model, decay)
        if poisoned.calls >= 3:
            next(ema.parameters()).data.fill_(float("inf"))
        poisoned.calls += 1

    poisoned.calls = 0
    monkeypatch.setattr(training, "ema_update", poisoned)
    module = run(tmp_path)
    assert module.global_step == 6
    ckpt = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("bad", [0, -1])
def test_max_bad_steps_must_be_positive(tmp_path, bad):
    with pytest.raises(training.UsageError, match="module.max_bad_steps"):
        run(tmp_path, f"module.max_bad_steps={bad}")
