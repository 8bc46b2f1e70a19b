"""Shared test helpers: compose the real configs with Hydra, shrunk to run in seconds on a CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The tests' matrices are small (the mixture's 192 x 192 covariances): BLAS threads only add synchronisation, up to
# 60x slower on a busy 2-core machine. Set before numpy is first imported, as conftest is loaded before test files.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The same for torch's own threads, in this process and in every one it starts (DDP workers, torchrun ranks): a forward
# of the tiny UNet takes 7 ms of CPU on one thread, and 50-60 ms on two when another job shares the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# With PYTHONDONTWRITEBYTECODE=1 (set on some machines to keep __pycache__ folders out of trees) every process the
# tests start compiles torch, Lightning and their imports from source: ~20 s of CPU a start instead of ~8. The suite
# keeps the bytecode in a cache of its own instead (.pytest_cache/pycache, mirroring the source paths), so the tree
# and the venv stay as clean as that setting wants; this process and every process it starts use it.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = str(ROOT / ".pytest_cache" / "pycache")
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    sys.dont_write_bytecode = False

import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import runpy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

# Overrides that turn any training config into a seconds-long CPU run on tiny synthetic data.
TINY_RUN = [
    "experiment=quickstart",
    # the settings the suite was written against (the quickstart's 32x32 run at DDPM's constant rate): tests that need
    # other ones say so; tests/test_train.py runs the quickstart's own cosine decay
    "data.image_size=32",
    "optim.lr=2e-4",
    "module.lr_decay=none",
    "trainer=cpu",
    "logger=csv",
    "data.num_images=64",
    "data.num_workers=0",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress",
    "callbacks.checkpoints.last_every_n_steps=3",
    "callbacks.samples.every_n_steps=3",
    "callbacks.samples.n=4",
    "callbacks.samples.steps=2",
    "model.ch=16",
    "model.norm_groups=8",
]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/<name>.yaml with `overrides`, as @hydra.main would build it, writing into `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations: run_name, paths.output_dir
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    """Never reach the network, never find a user's credentials, keep every file in the test's folder."""
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a loaded 2-core machine two threads spin against each other
    (a forward of the tiny UNet then takes up to 50 times longer). Use: pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def entry_point(monkeypatch):
    """`python SCRIPT ARGS...` run in this process: entry_point("train.py", "schedule=x") -> (exit code, stderr).

    Each new process would spend ~17 s importing Lightning; here the script runs from its file as `__main__`, as the
    interpreter runs it (Hydra finds conf/ beside it), with the command line in sys.argv. One real process per entry
    point still proves the path end to end (tests/test_train.py, tests/test_outputs.py). Hydra's job logging (a file
    handler in the run folder) is undone, so later tests do not write into this one's folder."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.chdir(ROOT)

    def run(script: str, *args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [script, *args])
        root, stderr = logging.getLogger(), io.StringIO()
        handlers, level = root.handlers[:], root.level
        try:
            with contextlib.redirect_stderr(stderr):
                runpy.run_path(str(ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        finally:
            for handler in set(root.handlers) - set(handlers):
                handler.close()
            root.handlers[:], root.level = handlers, level
        return code, stderr.getvalue()

    return run
