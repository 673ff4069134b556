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


def run_demo(out: Path, size: str = "demo", trials: int | None = None) -> RunSummary:
    """The demo on the `size` family; `trials` shortens the search (a quick look, or a test)."""
    with Progress() as progress:
        progress.line(f"building (or reusing) the {size} toy family ...")
        family = build_family(size=size, on_progress=progress.stages("toy family"))
    text = DEMO_CONFIG.read_text().replace(FAMILY_PLACEHOLDER, str(family.root))
    if trials is not None:
        config = yaml.safe_load(text)
        config["budget"]["trials"] = trials
        text = f"# configs/demo.yml with budget.trials: {trials}\n" + yaml.safe_dump(config, sort_keys=False)
    config_path = write_atomically(out / "search.yml", text)
    run = RunDir(out / RUN)
    if run.path.exists():
        shutil.rmtree(run.path)  # the demo's own previous run: each demo starts a fresh search
    summary = run_search(config_path)
    if summary.best is not None:
        best = write_atomically(out / run.best.name, run.read_text(run.best))
        print(f"best recipe: {best}  (reproduce it: mergekit-yaml {best} merged/)")
    return summary
