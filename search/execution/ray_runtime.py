"""Starting and stopping Ray for a search run: loopback-only locally, or joining a cluster by address.

Local defaults, and why:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is what makes a local Ray bind 127.0.0.1 instead of the machine's
  address and `::` (`_node_ip_address="127.0.0.1"` is silently rewritten, see shared/notes/stack.md).
- Token auth stays on: loopback ports are still reachable by every local user, and a Ray port runs arbitrary
  code. Instead of Ray's default `~/.ray/auth_token` (a file outside the run, shared by every run of the user)
  each driver process gets a fresh random token in `RAY_AUTH_TOKEN`, which Ray's processes inherit; a token
  or auth mode the user already set in the environment wins.
- Ray puts Unix sockets under its temp dir and socket paths are limited to ~107 bytes, so the session files
  live in a short `/tmp/evomerge-ray-<hash of run dir>` directory; the run dir's `ray` link points to it.
- Ray would relay every worker's stdout and stderr to the driver's terminal (lm-eval's progress bars and
  warnings, from each candidate): `log_to_driver=False` keeps them in the workers' own logs (locally, the run
  dir's logs/workers.log; see WorkerPool), and Ray's own INFO lines ("Started a local Ray instance") stay off.
"""

import hashlib
import ipaddress
import logging
import os
import secrets
from pathlib import Path

import ray
import ray.util
from ray._private import ray_constants
from ray._private.authentication import authentication_token_setup

from merge_core.errors import InputError
from search.config import SearchConfig

SHORT_TEMP_ROOT = Path("/tmp")
AUTH_ENV_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Every ray.init here: worker output and Ray's INFO lines kept off the driver's terminal (see above).
QUIET = {"log_to_driver": False, "logging_level": logging.WARNING}
MIN_WORKER_CPUS = 0.5


def ray_temp_dir(link: Path) -> Path:
    """The short, per-user, per-run directory Ray keeps its session files (and sockets) in."""
    key = f"{os.getuid()}:{Path(link).parent.resolve()}"  # the run dir: resolving the link itself would follow it
    return SHORT_TEMP_ROOT / f"evomerge-ray-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def start_ray(address: str | None, link: Path, num_cpus: int | None, object_store_mb: int = 100) -> None:
    """Start a loopback-only local Ray (address=None) or join the cluster at `address`. Idempotent.

    `link` (RunDir.ray_link) becomes a symlink to the local Ray's temp dir, so its logs are found from the run.

    num_cpus=None sizes a local Ray to the machine's cores; GPUs are detected by Ray itself.
    """
    if ray.is_initialized():
        return
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address is not None:
        # The cluster decides its own listeners, resources and auth; we only connect.
        ray.init(address=address, **QUIET)
        return
    # Ray reads this flag once, at import: set it for the processes Ray spawns, and for this process,
    # where ray is already imported, set the constant it was read into.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    if not any(name in os.environ for name in AUTH_ENV_VARS):
        # Ray turns token mode on by itself for a new local cluster (and refreshes its cached config);
        # setting the mode here would come too late for a config Ray read at import.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Ray then warns, every run, that token auth is on and how to opt out: a choice made here, not news.
        logging.getLogger(authentication_token_setup.__name__).setLevel(logging.ERROR)
    temp_dir = prepare_temp_dir(Path(link))
    ray.init(
        num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
        object_store_memory=object_store_mb * 1024**2,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        **QUIET,
    )
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:
        # The flag above is how this Ray version keeps off the network; fail loudly if it stops working.
        stop_ray()
        raise RuntimeError(f"local Ray bound {node_ip}, not 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was ignored")


def worker_cpus(config: SearchConfig) -> float:
    """The CPUs each worker actor asks for: its share of the running Ray's CPUs (a quarter CPU left to the
    driver's own tasks), at least half a CPU. Read from Ray, not this machine, since a cluster's workers run
    on other nodes, and a cluster may have shrunk since the run began (a lost node, then --resume). A Ray
    without room for every worker, or without the GPUs asked for, is one line naming the setting."""
    execution = config.execution
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    where = "the local Ray" if execution.ray_address == "local" else f"the Ray cluster at {execution.ray_address}"
    each = max(MIN_WORKER_CPUS, cpus / execution.workers - 0.25)
    if execution.workers * each > cpus + 1e-9:
        raise InputError(
            config.where,
            "execution.workers",
            f"expected at most {int(cpus / MIN_WORKER_CPUS)} workers ({where} has {cpus:g} CPUs, each worker needs "
            f"{MIN_WORKER_CPUS:g}), got {execution.workers}",
        )
    if execution.workers * execution.gpus_per_worker > gpus + 1e-9:
        raise InputError(
            config.where,
            "execution.gpus_per_worker",
            f"expected workers × gpus_per_worker within the {gpus:g} GPUs of {where}, "
            f"got {execution.workers} × {execution.gpus_per_worker:g}",
        )
    return each


def stop_ray() -> None:
    """Shut down the Ray this process started or joined. A no-op when none is running."""
    if ray.is_initialized():
        ray.shutdown()


def prepare_temp_dir(link: Path) -> Path:
    """Create the short temp dir (private to this user) and point the symlink `link` at it."""
    temp_dir = ray_temp_dir(link)
    temp_dir.mkdir(mode=0o700, exist_ok=True)
    # /tmp is shared: refuse a directory someone else created at our name (or a symlink planted there).
    if temp_dir.is_symlink() or temp_dir.stat().st_uid != os.getuid():
        raise RuntimeError(f"{temp_dir}: Ray temp dir is not a directory owned by this user; remove it and retry")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.readlink() != temp_dir:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(temp_dir, target_is_directory=True)
    return temp_dir
