"""Experiment loggers: W&B that falls back to offline mode instead of ever asking for a login."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["wandb", "has_wandb_credentials", "go_offline_without_credentials", "finish_wandb"]


def has_wandb_credentials() -> bool:
    """True when W&B could log in without a prompt: WANDB_API_KEY, or a .netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def go_offline_without_credentials(save_dir: str | Path) -> None:
    """Set WANDB_MODE=offline (and say so once) when no mode is set and W&B could not log in without a prompt."""
    if os.environ.get("WANDB_MODE") or has_wandb_credentials():
        return
    os.environ["WANDB_MODE"] = "offline"  # inherited by DDP workers and by wandb's own service process
    rank_zero_info(
        "W&B: no credentials found (WANDB_API_KEY or `wandb login`), so this run logs offline under "
        f"{Path(save_dir) / 'wandb'}. Upload it later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`, "
        "or set WANDB_MODE=disabled or logger=none to skip W&B."
    )


def wandb(save_dir: str, project: str = "diffusion", name: str | None = None, id: str | None = None, **kwargs: Any):
    """A Lightning WandbLogger whose files live under `save_dir/wandb`; offline, and says so, without credentials.

    `id` names the W&B run: a resumed training run passes the id from its checkpoint, so its charts continue.
    """
    go_offline_without_credentials(save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, name=name, id=id, resume="allow" if id else None, **kwargs)


def finish_wandb() -> None:
    """Close this process's W&B run, if any, so its files are complete when train() returns, not at exit."""
    import wandb as wandb_sdk

    if wandb_sdk.run is not None:
        wandb_sdk.finish()
