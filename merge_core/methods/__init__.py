"""Registry of merge methods: one module per method, each exporting METHOD."""

from merge_core.methods import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    model_stock,
    nuslerp,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
from merge_core.methods.spec import MergeInputs, MergeMethod, Param

METHODS: dict[str, MergeMethod] = {
    module.METHOD.name: module.METHOD
    for module in (
        linear,
        slerp,
        nuslerp,
        task_arithmetic,
        ties,
        dare_ties,
        dare_linear,
        breadcrumbs,
        breadcrumbs_ties,
        della,
        della_linear,
        model_stock,
        passthrough,
    )
}

__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Param"]
