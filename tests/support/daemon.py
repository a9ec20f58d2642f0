"""Running watcher in tests: config files, the daemon in-process (in the test's own Trio
loop) or as a real subprocess (for signals and kill -9), and bounded waiting."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pluggy
import tomli_w
import trio
from prometheus_client import CollectorRegistry

from watcher.clock import Clock
from watcher.daemon import Daemon

ROOT = Path(__file__).resolve().parents[2]
TEST_MNEMONIC = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about"
API_TOKEN = "test-token-0123456789"
AUTH = {"authorization": f"Bearer {API_TOKEN}"}  # the API token's header


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chain_entry(name: str, url: str, *, tokens: Sequence[tuple[str, str, int]] = (), **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": name, "family": "evm", "rpc_url": url, "native_symbol": "ETH",
                             "confirmations": 2, "start_block": 0, "poll_interval": 0.1}
    entry.update(extra)
    if tokens:
        entry["assets"] = [{"symbol": s, "contract": c, "decimals": d} for s, c, d in tokens]
    return entry


def write_config(directory: Path, chains: list[dict[str, Any]], *, mnemonic: str = TEST_MNEMONIC,
                 api_port: int | None = None, extra: dict[str, Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    seed = directory / "seed.txt"
    if not seed.exists():
        seed.write_text(mnemonic + "\n")
        seed.chmod(0o600)
    config: dict[str, Any] = {
        "storage": {"path": "watcher.db"},
        "keys": {"mnemonic_file": "seed.txt"},
        "api": {"listen": f"127.0.0.1:{api_port or free_port()}", "token": API_TOKEN},
        "log": {"level": "debug", "format": "json"},
        # test receivers listen on loopback, which is refused unless listed
        "webhooks": {"allowed_hosts": ["127.0.0.1"]},
        "chains": chains,
    }
    for k, v in (extra or {}).items():
        config[k] = {**config.get(k, {}), **v} if isinstance(v, dict) else v
    path = directory / "watcher.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


@contextlib.asynccontextmanager
async def running(config_path: Path, *, api: bool = False, clock: Clock | None = None,
                  pm: pluggy.PluginManager | None = None) -> AsyncIterator[Daemon]:
    """Run a daemon inside the test's Trio loop; stops (cancels) it on exit."""
    daemon = Daemon.open(config_path, pm=pm, registry=CollectorRegistry(), clock=clock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: daemon.run(api=api, task_status=task_status))
            yield daemon
            nursery.cancel_scope.cancel()
    finally:
        daemon.close()


async def wait_until(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = trio.current_time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(interval)


class DaemonProcess:
    """``watcher run`` as a real subprocess, stopped by PID."""

    def __init__(self, config_path: Path, *, log_path: Path | None = None, env: dict[str, str] | None = None):
        self.config_path = config_path
        self.log_path = log_path or config_path.parent / "daemon.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(self.config_path.parent),
            env={**os.environ, **self.env}, start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a power cut for the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1, trust_env=False)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout}s")
