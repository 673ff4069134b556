"""How long one GP ask takes as the genome grows: the cost behind search/optimizers/gp.py's MAX_GENES.

    .venv/bin/python experiments/bench_gp_ask.py [--genes 20,50,100,200] [--told 50] [--asks 5] [--fill random|gp]

For each genome size, a study in a temporary run directory gets --told finished trials on the sphere, drawn by
--fill (random: costs nothing to ask, the history spread uniformly; gp: the history a GP search makes, clustered
where it found good values), is reopened as the gp optimizer (as `--resume` would), asked once untimed (the first
GP ask imports torch), then --asks asks are timed, each told before the next; the table prints the median, min
and max wall seconds per ask, and the median CPU seconds of this process (the GP runs on one thread, so on an idle
machine the two agree; on a shared one the CPU column is the ask's own cost).
The asks go through make_optimizer and the sqlite storage, as a search's do.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from search.config import SearchConfig
from search.genome import Genome
from search.optimizers import Optimizer, make_optimizer
from search.run_dir import RunDir


def open_optimizer(run_dir: Path, name: str, genes: int, resume: bool) -> Optimizer:
    """task_arithmetic of one fine-tune with filters [mlp] has 2 + 2 * layers genes (embeddings, head, then mlp
    and the rest per layer): `genes` must be even."""
    layers = (genes - 2) // 2
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{part}.weight" for i in range(layers) for part in ("mlp.up_proj", "input_layernorm")
    ]
    data = {
        "models": {"base": "org/base", "fine_tunes": ["org/a"]},
        "merge": {"method": "task_arithmetic"},
        "objectives": [{"task": "task", "metric": "acc", "direction": "minimize"}],
        "genome": {"filters": ["mlp"]},
        "optimizer": {"name": name},
    }
    config = SearchConfig.from_dict(data, where="bench.yml")
    genome = Genome(config, names, layers)
    assert genome.dim == genes, (genome.dim, genes)
    return make_optimizer(config, genome, RunDir(run_dir), resume=resume)


def tell_sphere(optimizer: Optimizer) -> tuple[float, float]:
    """Ask, tell the sphere's value; the wall and CPU seconds the ask took."""
    wall, cpu = time.perf_counter(), time.process_time()
    trial = optimizer.ask()
    seconds = time.perf_counter() - wall, time.process_time() - cpu
    optimizer.tell(trial.number, [float(np.sum((trial.x - 0.3) ** 2))])
    return seconds


def bench(genes: int, told: int, asks: int, fill: str) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix=f"bench-gp-{genes}-") as run_dir:
        filler = open_optimizer(Path(run_dir), fill, genes, resume=False)
        for _ in range(told):
            tell_sphere(filler)
        gp = open_optimizer(Path(run_dir), "gp", genes, resume=True)
        tell_sphere(gp)  # untimed: the first GP ask imports torch and scipy.optimize
        return [tell_sphere(gp) for _ in range(asks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", default="20,50,100,200")
    parser.add_argument("--told", type=int, default=50)
    parser.add_argument("--asks", type=int, default=5)
    parser.add_argument("--fill", choices=["random", "gp"], default="random")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{'genes':>6} {'told':>5} {'fill':>6} {'median':>8} {'min':>8} {'max':>8} {'cpu':>8}")
    for genes in (int(g) for g in args.genes.split(",")):
        wall, cpu = zip(*bench(genes, args.told, args.asks, args.fill), strict=True)
        stats = (statistics.median(wall), min(wall), max(wall), statistics.median(cpu))
        times = " ".join(f"{t:>7.2f}s" for t in stats)
        print(f"{genes:>6} {args.told:>5} {args.fill:>6} {times}", flush=True)


if __name__ == "__main__":
    main()
