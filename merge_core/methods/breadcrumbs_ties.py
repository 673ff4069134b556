"""Model Breadcrumbs with the TIES sign election."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import MAGNITUDE_OUTLIERS

METHOD = task_arithmetic_method(
    "breadcrumbs_ties", sparsifier=MAGNITUDE_OUTLIERS, sign_consensus=True, normalize=False, rescale=False
)
