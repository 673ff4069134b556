"""The house rules, checked on the source: layering, no pickle, and run-dir file names owned by RunDir."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge_core", "evaluators", "search")
# What each package may import of the others: merge_core is the bottom; search composes the two.
ALLOWED = {"merge_core": set(), "evaluators": {"merge_core"}, "search": {"merge_core", "evaluators"}}
RUN_DIR_FILES = ("optuna.db", "mlflow.db", "summary.json", "report.md", "best.yml", "tracking.json", "heldout_items")


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_layers_below(package):
    for path in sources(package):
        others = imported_packages(path) & set(PACKAGES) - {package}
        assert others <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {sorted(others - ALLOWED[package])}"


def test_nothing_unpickles():
    for package in PACKAGES:
        for path in sources(package):
            assert not imported_packages(path) & {"pickle", "dill", "cloudpickle"}, path.relative_to(ROOT)
            assert "allow_pickle=True" not in path.read_text(), path.relative_to(ROOT)


def code_strings(path: Path) -> list[str]:
    """Every string literal the code uses, docstrings left out (they may name files to explain them)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_only_the_run_dir_spells_run_dir_file_names():
    for path in sources("search"):
        if path.name == "run_dir.py":
            continue
        for text in code_strings(path):
            named = [name for name in RUN_DIR_FILES if name in text]
            assert not named, f"{path.relative_to(ROOT)} spells {named[0]} in {text!r}"


def test_the_cluster_manifest_runs_the_ray_this_project_installs():
    """KubeRay starts the image's own Ray: a rayVersion other than the installed one would be a mismatch the
    cluster finds only at start."""
    import ray
    import yaml

    manifest = yaml.safe_load((ROOT / "docker" / "raycluster.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["spec"]["rayVersion"] == ray.__version__
    workers = manifest["spec"]["workerGroupSpecs"]
    assert all(
        int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0 for w in workers
    )
