"""`evomerge demo`: build (or reuse) the demo toy family and run configs/demo.yml on it, start to finish."""

import shutil
from pathlib import Path

from evaluators.toy_family import build_family
from search.report import RunSummary
from search.runner import BEST_FILE, run_search

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yml"
FAMILY_PLACEHOLDER = "{family}"


def run_demo(out: Path) -> RunSummary:
    print("building (or reusing) the demo toy family ...", flush=True)
    family = build_family(size="demo")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "search.yml"
    config_path.write_text(DEMO_CONFIG.read_text().replace(FAMILY_PLACEHOLDER, str(family.root)))
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own previous run: each demo starts a fresh search
    summary = run_search(config_path)
    if summary.best is not None:
        shutil.copy(run_dir / BEST_FILE, out / BEST_FILE)
        print(f"best recipe: {out / BEST_FILE}  (reproduce it: mergekit-yaml {out / BEST_FILE} merged/)")
    return summary
