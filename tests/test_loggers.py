"""W&B without a reachable server: offline within seconds, with the way to sync later; only 127.0.0.1 is contacted."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from diffusion.cli import loggers
from diffusion.errors import UsageError
from train import train

from .conftest import TINY_RUN, compose_config


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once, as for a server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def open_port() -> Iterator[int]:
    """A local port that accepts connections (the kernel completes them; nobody needs to answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def key_but_no_server(monkeypatch, closed_port) -> str:
    """An API key, no WANDB_MODE, and a W&B server address where nothing answers (no proxy in between)."""
    url = f"http://127.0.0.1:{closed_port}"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_X_DISABLE_UPDATE_CHECK", "true")
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return url


def test_an_unreachable_server_means_offline_within_seconds_and_says_how_to_sync(tmp_path, key_but_no_server):
    """wandb 0.31 alone waits its 90 s init_timeout here, then raises CommError."""
    start = time.monotonic()
    with pytest.warns(UserWarning, match=f"cannot reach {key_but_no_server}.*wandb sync {tmp_path / 'wandb'}"):
        logger = loggers.wandb(str(tmp_path), connect_timeout=2)
    decided = time.monotonic() - start
    run = logger.experiment  # wandb.init happens here
    elapsed = time.monotonic() - start
    try:
        assert os.environ["WANDB_MODE"] == "offline"
        assert run.settings.mode == "offline" and run.offline
        assert decided < 3, f"the probe took {decided:.1f} s"  # refused at once; at most connect_timeout
        # wandb's own offline start (its service process) takes 1-5 s on a busy 2-core machine
        assert elapsed < 20, f"W&B took {elapsed:.0f} s to come up offline"
    finally:
        loggers.finish_wandb()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_training_logs_offline_when_the_server_is_unreachable(tmp_path, key_but_no_server):
    cfg = compose_config("train", [*TINY_RUN, "trainer.max_steps=3", "logger=wandb", "logger.connect_timeout=2"],
                         tmp_path)  # fmt: skip
    with pytest.warns(UserWarning, match="cannot reach"):
        train(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert b"train/loss" in next(run_dir.glob("*.wandb")).read_bytes()


@pytest.fixture
def not_wandb(monkeypatch, key_but_no_server) -> Iterator[str]:
    """A server that answers every request with a captive portal's HTML page: TCP opens, so `reachable` passes."""
    import http.server

    class Portal(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's names)
            body = b"<html><body>Welcome to the hotel wifi. Please log in.</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_is_not_wandb_means_offline_too(tmp_path, not_wandb):
    """A proxy, a captive portal or a wrong WANDB_BASE_URL passes the reachability check; wandb.init then failed with
    its own error and stopped the run. Now the run trains and logs offline, and says why."""
    cfg = compose_config("train", [*TINY_RUN, "trainer.max_steps=3", "logger=wandb", "logger.connect_timeout=2"],
                         tmp_path)  # fmt: skip
    with pytest.warns(UserWarning, match=f"W&B: {not_wandb} answered, but not as a W&B server would"):
        assert train(cfg).global_step == 3
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert b"train/loss" in next(run_dir.glob("*.wandb")).read_bytes()


def test_a_run_that_logs_elsewhere_never_imports_wandb(tmp_path, monkeypatch):
    """The GPU check logs to CSV, on machines that may lack W&B (.ci/gpu_wheels brings none): its runs must not
    import wandb, not even to close a W&B run that never started."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    cfg = compose_config("train", [*TINY_RUN, "trainer.max_steps=2"], tmp_path)
    assert cfg.logger._target_.endswith("CSVLogger")
    assert train(cfg).global_step == 2


def test_wandb_not_installed_says_how_to_install_it_or_log_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UsageError, match=r"not installed: `pip install wandb`, or .* logger=csv"):
        loggers.wandb(str(tmp_path))
    assert "WANDB_MODE" not in os.environ  # refused before announcing an offline run


def test_a_reachable_server_keeps_the_mode_unset(tmp_path, monkeypatch, key_but_no_server, open_port):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{open_port}")
    loggers.go_offline_without_server(tmp_path, timeout=2)
    assert "WANDB_MODE" not in os.environ


def test_an_explicit_mode_is_never_probed_or_changed(tmp_path, monkeypatch, key_but_no_server):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(loggers, "reachable", lambda *a: pytest.fail("probed although WANDB_MODE was set"))
    loggers.go_offline_without_server(tmp_path, timeout=2)
    assert os.environ["WANDB_MODE"] == "online"


def test_a_connection_that_hangs_counts_as_unreachable_after_the_timeout(monkeypatch, open_port):
    """A name lookup or connect that never returns (a black-holed network) is cut off by the timeout."""
    released = threading.Event()

    def hang(*args, **kwargs):
        released.wait(60)
        raise OSError("released by the test")

    monkeypatch.setattr(loggers.socket, "create_connection", hang)
    start = time.monotonic()
    assert not loggers.reachable(f"http://127.0.0.1:{open_port}", timeout=0.5)
    assert time.monotonic() - start < 3
    released.set()


def test_the_probe_goes_through_the_proxy_the_environment_sets(monkeypatch, key_but_no_server, open_port):
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{open_port}")
    assert loggers.reachable(key_but_no_server, timeout=2)  # the proxy answers for the server
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert not loggers.reachable(key_but_no_server, timeout=2)  # direct, to the closed port


def test_the_server_from_wandb_login_host_is_the_one_probed(tmp_path, monkeypatch, closed_port):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert loggers.base_url() == "https://api.wandb.ai"
    config_dir = tmp_path / "wandb-config"  # conftest points WANDB_CONFIG_DIR here
    config_dir.mkdir(exist_ok=True)
    (config_dir / "settings").write_text(f"[default]\nbase_url = http://127.0.0.1:{closed_port}\n")
    assert loggers.base_url() == f"http://127.0.0.1:{closed_port}"
