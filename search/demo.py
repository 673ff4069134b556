"""`evomerge demo`: build (or reuse) the demo toy family and run configs/demo.yml on it, start to finish."""

import shutil
from pathlib import Path

import yaml

from evaluators.toy_family import build_family
from search.progress import Progress
from search.results.summary import RunSummary
from search.run_dir import RunDir, write_atomically
from search.runner import run_search

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yml"
FAMILY_PLACEHOLDER = "{family}"
RUN = "run"  # the demo's run directory, inside its output folder (configs/demo.yml says output_dir: run)


# What `--backend vllm` changes: vLLM's CPU build needs no compile step in eager mode (a first request would
# otherwise spend ~20 s compiling), and a KV cache the size of these prompts, not vLLM's default share of RAM.
VLLM_EVALUATION = {"backend": "vllm", "vllm": {"enforce_eager": True, "kv_cache_memory": "1GiB"}}


def run_demo(out: Path, size: str = "demo", trials: int | None = None, backend: str = "hf") -> RunSummary:
    """The demo on the `size` family; `trials` shortens the search (a quick look, or a test); `backend` scores
    candidates with HF in memory (configs/demo.yml) or in a vLLM engine."""
    with Progress() as progress:
        progress.line(f"building (or reusing) the {size} toy family ...")
        family = build_family(size=size, on_progress=progress.stages("toy family"))
    text = DEMO_CONFIG.read_text().replace(FAMILY_PLACEHOLDER, str(family.root))
    changes = []
    config = yaml.safe_load(text)
    if trials is not None:
        config["budget"]["trials"] = trials
        changes.append(f"budget.trials: {trials}")
    if backend == "vllm":
        config["evaluation"] |= VLLM_EVALUATION
        changes.append("evaluation.backend: vllm")
    if changes:
        text = f"# configs/demo.yml with {', '.join(changes)}\n" + yaml.safe_dump(config, sort_keys=False)
    config_path = write_atomically(out / "search.yml", text)
    run = RunDir(out / RUN)
    if run.path.exists():
        shutil.rmtree(run.path)  # the demo's own previous run: each demo starts a fresh search
    summary = run_search(config_path)
    if summary.best is not None:
        best = write_atomically(out / run.best.name, run.read_text(run.best))
        print(f"best recipe: {best}  (reproduce it: mergekit-yaml {best} merged/)")
    return summary
