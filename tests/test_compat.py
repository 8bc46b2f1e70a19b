"""Nothing a user has breaks: a checkpoint written by main before the package was laid out anew (tests/fixtures)
samples the very images it sampled then, and resumes."""

from __future__ import annotations

import numpy as np
import pytest

from sample import sample
from train import train

from .conftest import ROOT, compose_config

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_an_old_checkpoint_samples_the_same_images(sampler, tmp_path):
    overrides = [f"ckpt={FIXTURES / 'v2_main.ckpt'}", f"sampler={sampler}", "steps=10", "n_samples=4",
                 "batch_size=4", "logger=none", "device=cpu"]  # fmt: skip
    images = sample(compose_config("sample", overrides, tmp_path))
    np.testing.assert_array_equal(images, np.load(FIXTURES / "v2_main_samples.npz")[sampler])


def test_an_old_checkpoint_resumes(tmp_path):
    overrides = [f"resume={FIXTURES / 'v2_main.ckpt'}", "trainer.max_steps=42", "logger=csv"]
    assert train(compose_config("train", overrides, tmp_path)).global_step == 42
