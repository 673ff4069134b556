"""What a search checks before anything starts (no Ray, no run dir), and what each worker is told to load.

Whatever can be wrong before the first trial is found here, as one InputError line: sources that do not fit
together, tasks and metrics that do not resolve, a device this machine does not have.
"""

import os
from dataclasses import dataclass

import torch

from evaluators import Evaluator
from merge_core import architecture
from merge_core.errors import InputError
from merge_core.sources import check_compatible, read_info
from search.config import SearchConfig
from search.execution.worker import WorkerSpec


@dataclass(frozen=True)
class Preflight:
    tensor_names: list[str]
    num_layers: int


def preflight(config: SearchConfig) -> Preflight:
    check_device(config)
    infos = [read_info(ref) for ref in [config.models.base, *config.models.fine_tunes]]
    check_compatible(infos)
    names = list(infos[0].shapes)
    Evaluator(config.eval_config(), config.objective_specs())
    if config.held_out.tasks:
        Evaluator(config.eval_config(), config.held_out_specs())
    return Preflight(tensor_names=names, num_layers=architecture.num_layers(names))


def check_device(config: SearchConfig) -> None:
    """A local run's workers live on this machine: a CUDA device it lacks would fail every worker's start."""
    device = config.execution.device
    if config.execution.ray_address != "local" or not device.startswith("cuda"):
        return  # 'auto' adapts; on a cluster each worker's node decides what it has
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device (torch sees none)"
        raise InputError(
            config.where, "execution.device", f"expected a device this machine has ({have}), got {device!r}"
        )


def worker_spec(config: SearchConfig) -> WorkerSpec:
    return WorkerSpec(
        models=(config.models.base, *config.models.fine_tunes),
        device=config.execution.device,
        eval_config=config.eval_config(),
        search_tasks=tuple(config.objective_specs()),
        heldout_tasks=tuple(config.held_out_specs()),
        threads=max(1, (os.cpu_count() or 1) // config.execution.workers),
        trust_remote_code=config.trust_remote_code,
    )
