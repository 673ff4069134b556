"""`evomerge demo`: build (or reuse) the demo toy family and run configs/demo.yml on it, start to finish."""

import shutil
from pathlib import Path

from evaluators.toy_family import build_family
from search.results.summary import RunSummary
from search.run_dir import RunDir, write_atomically
from search.runner import run_search

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yml"
FAMILY_PLACEHOLDER = "{family}"
RUN = "run"  # the demo's run directory, inside its output folder (configs/demo.yml says output_dir: run)


def run_demo(out: Path) -> RunSummary:
    print("building (or reusing) the demo toy family ...", flush=True)
    family = build_family(size="demo")
    config_path = write_atomically(
        out / "search.yml", DEMO_CONFIG.read_text().replace(FAMILY_PLACEHOLDER, str(family.root))
    )
    run = RunDir(out / RUN)
    if run.path.exists():
        shutil.rmtree(run.path)  # the demo's own previous run: each demo starts a fresh search
    summary = run_search(config_path)
    if summary.best is not None:
        best = write_atomically(out / "best.yml", run.read_text(run.best))
        print(f"best recipe: {best}  (reproduce it: mergekit-yaml {best} merged/)")
    return summary
