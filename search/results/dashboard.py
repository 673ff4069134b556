"""`evomerge ui RUN_DIR`: a search's MLflow runs (and, with --optuna, its Optuna study) in the browser.

Each server is a child process in its own process group, bound to 127.0.0.1: Ctrl-C in the terminal reaches
evomerge alone, which then stops every group whole (MLflow's uvicorn worker with it) and exits 0.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from merge_core.errors import InputError
from search.run_dir import RunDir

HOST = "127.0.0.1"
DEFAULT_PORT = 5000
READY_TIMEOUT_S = 120.0  # MLflow's first start on a database runs its migrations: tens of seconds on 2 cores
STOP_TIMEOUT_S = 10.0
# Job execution would start ~10 server processes (~1.9 GiB) that browsing runs never needs.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# The polls go straight to loopback: an http_proxy in the environment must not intercept them.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    name: str
    port: int
    command: list[str]
    ready_path: str  # answers 200 once the server serves
    page: str  # what to open, below the server's root
    process: subprocess.Popen | None = None
    log: IO[bytes] | None = None  # its output, shown only if it fails

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def tracking_state(run: RunDir) -> dict[str, Any]:
    """The run's tracking.json: where the search logged (tracking_uri) and its parent run."""
    state = run.read_json(run.tracking)
    for key in ("tracking_uri", "experiment_id", "parent_run_id"):
        if not isinstance(state, dict) or not isinstance(state.get(key), str):
            raise InputError(run.tracking, key, "expected a string, as the search's tracker writes it; got none")
    return state


def run_page(state: dict[str, Any]) -> str:
    """The parent run's page in the MLflow UI, relative to its root."""
    return f"/#/experiments/{state['experiment_id']}/runs/{state['parent_run_id']}"


def mlflow_server(tracking_uri: str, port: int, state: dict[str, Any]) -> Server:
    # The experiment's artifact_location (file:// beside the database) is served as it is: no flag needed.
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    return Server("MLflow", port, command, "/health", run_page(state))


def optuna_server(run: RunDir, port: int) -> Server:
    if not run.storage.is_file():  # optuna-dashboard would create an empty study database instead
        raise InputError(run.storage, None, "expected the search's Optuna study, got no such file")
    command = [sys.executable, "-m", "optuna_dashboard._cli", f"sqlite:///{run.storage}"]
    # wsgiref, not gunicorn: one process, and no control socket left in the user's home directory
    command += ["--host", HOST, "--port", str(port), "--server", "wsgiref", "--quiet"]
    return Server("Optuna", port, command, "/", "/dashboard")


def check_free(server: Server) -> None:
    if not 0 < server.port < 65536:
        raise InputError("--port", None, f"expected a port number from 1 to 65535 for {server.name}, got {server.port}")
    with socket.socket() as probe:
        # SO_REUSEADDR as the servers set it: a port whose old connections linger in TIME_WAIT is free to them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, server.port))
        except OSError:
            raise InputError(
                f"port {server.port}",
                None,
                f"expected a free port on {HOST} for {server.name}, got one in use; choose another with --port",
            ) from None


def start(server: Server) -> None:
    server.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop(), after the server is gone)
    server.process = subprocess.Popen(
        server.command,
        stdin=subprocess.DEVNULL,
        stdout=server.log,
        stderr=subprocess.STDOUT,
        env=os.environ | SERVER_ENV,
        start_new_session=True,  # its own group: the terminal's Ctrl-C is ours to handle, and stop() ends it whole
    )


def last_line(server: Server) -> str:
    server.log.seek(0)
    lines = server.log.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while server.process.poll() is None:
        try:
            with LOOPBACK.open(server.url + server.ready_path, timeout=2):
                return
        except OSError:  # refused while it starts, or an HTTP error: ask again
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} did not answer at {server.url} within {READY_TIMEOUT_S:.0f} s: {last_line(server)}"
                ) from None
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} exited with code {server.process.returncode}: {last_line(server)}")


def stop(server: Server) -> None:
    group = server.process.pid  # start_new_session: the leader's pid is its group's id
    _signal_group(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(STOP_TIMEOUT_S)
    # The leader may exit before its workers (mlflow's CLI before uvicorn): whatever is left goes now.
    _signal_group(group, signal.SIGKILL)
    server.process.wait()
    server.log.close()


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
        os.killpg(group, signum)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM too (a service manager, a test): the servers stop either way


def serve(run_dir: Path, port: int = DEFAULT_PORT, optuna: bool = False, say: Callable[[str], None] = print) -> None:
    """Serve the run's MLflow UI on `port` (runs on a tracking server are only pointed at) and, with `optuna`,
    optuna-dashboard on port + 1, until Ctrl-C or SIGTERM."""
    run = RunDir.open(run_dir)
    state = tracking_state(run)
    uri = state["tracking_uri"]
    remote = uri.startswith(("http://", "https://"))
    servers = [] if remote else [mlflow_server(uri, port, state)]
    servers += [optuna_server(run, port + 1)] if optuna else []
    for server in servers:
        check_free(server)
    if remote:
        say(f"MLflow (served by its tracking server): {uri.rstrip('/')}{run_page(state)}")
    if servers:
        run_servers(servers, say)


def run_servers(servers: list[Server], say: Callable[[str], None]) -> None:
    # Both set here: a process started in the background of a script inherits SIGINT ignored.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    started: list[Server] = []
    try:
        for server in servers:
            start(server)
            started.append(server)
            say(f"{server.name}: {server.url}{server.page}")
        for server in servers:
            wait_ready(server)
        say(f"serving on {HOST}; Ctrl-C stops")
        while all(server.process.poll() is None for server in servers):
            time.sleep(0.5)
        gone = next(server for server in servers if server.process.poll() is not None)
        raise RuntimeError(f"{gone.name} stopped on its own (exit code {gone.process.returncode}): {last_line(gone)}")
    except KeyboardInterrupt:
        say("stopping")
    finally:
        for signum in previous:  # a second Ctrl-C must not leave a server behind
            signal.signal(signum, signal.SIG_IGN)
        for server in started:
            stop(server)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
