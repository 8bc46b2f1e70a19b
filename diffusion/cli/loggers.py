"""Experiment loggers: W&B that falls back to offline mode instead of asking for a login or waiting for a server
it cannot reach."""

from __future__ import annotations

import configparser
import importlib.util
import netrc
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..errors import UsageError

__all__ = ["wandb", "OfflineFallbackWandbLogger", "has_wandb_credentials", "go_offline_without_credentials",
           "go_offline_without_server", "reachable", "base_url", "finish_wandb"]  # fmt: skip


def base_url() -> str:
    """The W&B server as wandb finds it: WANDB_BASE_URL, else `wandb login --host`'s settings file, else the cloud."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    settings = configparser.ConfigParser()
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    try:
        settings.read(config_dir / "settings")
    except configparser.Error:
        pass  # wandb itself will complain about its own file
    return settings.get("default", "base_url", fallback="https://api.wandb.ai")


def has_wandb_credentials() -> bool:
    """True when W&B could log in without a prompt: WANDB_API_KEY, or a .netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url()).hostname or "api.wandb.ai"
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


def reachable(url: str, timeout: float) -> bool:
    """True when a TCP connection to the URL's host (or to the proxy the environment sets for it) opens within
    `timeout` seconds, name lookup included: a thread bounds it, as getaddrinfo has no timeout of its own."""
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def go_offline_without_server(save_dir: str | Path, timeout: float) -> None:
    """Set WANDB_MODE=offline (and warn) when no mode is set and the W&B server does not answer within `timeout`
    seconds: wandb.init would wait its own init_timeout (90 s) and then stop the run."""
    url = base_url()
    if os.environ.get("WANDB_MODE") or reachable(url, timeout):
        return
    os.environ["WANDB_MODE"] = "offline"
    runs = Path(save_dir) / "wandb"
    rank_zero_warn(
        f"W&B: cannot reach {url} within {timeout:g} s, so this run logs offline under {runs}. Upload it later, "
        f"from a machine that can reach the server, with `wandb sync {runs}/offline-run-*`; set WANDB_MODE=online "
        "to insist on the server, or WANDB_MODE=disabled or logger=none to skip W&B."
    )


def wandb(save_dir: str, project: str = "diffusion", name: str | None = None, id: str | None = None,
          connect_timeout: float = 5.0, **kwargs: Any):  # fmt: skip
    """A Lightning WandbLogger whose files live under `save_dir/wandb`; offline, and says so, without credentials
    or when the server does not answer within `connect_timeout` seconds.

    `id` names the W&B run: a resumed training run passes the id from its checkpoint, so its charts continue.
    """
    if importlib.util.find_spec("wandb") is None:
        raise UsageError("logger=wandb needs W&B, which is not installed: `pip install wandb`, or log to CSV with "
                         "logger=csv (or logger=none)")  # fmt: skip
    go_offline_without_credentials(save_dir)
    go_offline_without_server(save_dir, connect_timeout)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return OfflineFallbackWandbLogger(save_dir=save_dir, project=project, name=name, id=id,
                                      resume="allow" if id else None, **kwargs)  # fmt: skip


class OfflineFallbackWandbLogger(WandbLogger):
    """Lightning's WandbLogger, but a server that answers without being W&B (a proxy, a captive portal, a wrong
    WANDB_BASE_URL: it passes `reachable`) or refuses the run makes it log offline, said once, instead of stopping
    the run with wandb's error when the run starts."""

    @property
    @rank_zero_experiment
    def experiment(self):
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as error:
            errors = getattr(sys.modules.get("wandb"), "errors", None)
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
            if errors is None or not isinstance(error, errors.Error) or offline:
                raise
            first = " ".join(str(error).split())[:200]
            sys.modules["wandb"].teardown()  # the failed start still holds the run id in wandb's service process
            os.environ["WANDB_MODE"] = "offline"
            self._wandb_init["mode"] = "offline"
            runs = Path(self.save_dir or ".") / "wandb"
            rank_zero_warn(
                f"W&B: {base_url()} answered, but not as a W&B server would ({type(error).__name__}: {first}), so "
                f"this run logs offline under {runs}. Upload it later with `wandb sync {runs}/offline-run-*` from a "
                "machine that reaches W&B; check WANDB_BASE_URL and proxies, or set WANDB_MODE=disabled"
            )
            return WandbLogger.experiment.fget(self)


def finish_wandb() -> None:
    """Close this process's W&B run, if any, so its files are complete when train() returns, not at exit.

    `finish` alone can return while wandb's service process is still writing the run's file (seen with a second
    run in one process under load); `teardown` waits for the service and stops it (the next run starts a new one).
    A process that never imported wandb has no run, and need not have W&B installed (a CSV-logged GPU check)."""
    wandb_sdk = sys.modules.get("wandb")
    if getattr(wandb_sdk, "run", None) is not None:
        wandb_sdk.finish()
        wandb_sdk.teardown()
