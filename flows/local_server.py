"""Start and stop a Prefect server and process workers on loopback, with their own Prefect home.

For trying the orchestration on one machine (docs/ORCHESTRATION.md) and for
the server tests: every process gets the same environment (``PREFECT_HOME``,
``PREFECT_API_URL``, analytics off), listens on 127.0.0.1 only, and is stopped
by its own process id.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prefect_environment(home: Path, api_url: str) -> dict[str, str]:
    """This process's environment pointed at one Prefect home and API (and the venv first on PATH)."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DVC_NO_ANALYTICS": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            # Workers ask for work every second instead of every 10 s (loopback, few runs).
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        }
    )
    return env


@dataclass(frozen=True)
class LocalServer:
    """A running server: ``api_url`` for clients and workers, ``ui_url`` for a browser."""

    api_url: str
    ui_url: str
    home: Path
    process: subprocess.Popen


def _healthy(api_url: str, auth: str | None = None) -> bool:
    request = urllib.request.Request(f"{api_url}/health")
    if auth:  # a server started with PREFECT_SERVER_API_AUTH_STRING answers only with it
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def stop_process(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group we started (twice: a Prefect worker wants a second one), then SIGKILL."""
    if process.poll() is not None:
        return
    for _ in range(2):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s / 2)
            return
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(timeout=grace_s)


@contextmanager
def local_prefect_server(
    home: Path, port: int | None = None, timeout_s: float = 180.0, health_auth: str | None = None
) -> Iterator[LocalServer]:
    """``prefect server start --host 127.0.0.1 --port <port>`` with ``PREFECT_HOME=home``; waits until healthy.

    The server's output goes to ``home/server.log``. Raises with that log's tail if it does not come up.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_loopback_port()
    ui_url = f"http://127.0.0.1:{port}"
    api_url = f"{ui_url}/api"
    log_path = home / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=prefect_environment(home, api_url),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(api_url, health_auth):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"Prefect server on {api_url} did not become healthy; {log_path}:\n{tail}")
            time.sleep(0.5)
        yield LocalServer(api_url=api_url, ui_url=ui_url, home=home, process=process)
    finally:
        stop_process(process)


@contextmanager
def process_worker(
    server: LocalServer,
    pool: str,
    work_queue: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool <pool> [--work-queue <queue>]`` against ``server``; log in its home.

    ``extra_env``: e.g. ``{"WEAKCLIP_REPO": "/path/to/checkout"}`` for prefect.yaml's pull step.
    """
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if work_queue:
        command += ["--work-queue", work_queue]
    log_path = server.home / f"worker-{pool}-{work_queue or 'all'}.log"
    for number in range(2, 1000):  # several workers on one queue (several machines): one log each
        if not log_path.exists():
            break
        log_path = server.home / f"worker-{pool}-{work_queue or 'all'}-{number}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            env={**prefect_environment(server.home, server.api_url), **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process(process)


def drain_prefect_clients(timeout_s: float = 30.0) -> None:
    """Send this process's queued logs and events now, before the server they go to is stopped.

    Otherwise the background senders keep retrying a closed port at interpreter exit.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)
