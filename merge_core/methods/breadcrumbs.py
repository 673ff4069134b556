"""Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest outliers and the smallest entries."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import MAGNITUDE_OUTLIERS

METHOD = task_arithmetic_method(
    "breadcrumbs", sparsifier=MAGNITUDE_OUTLIERS, sign_consensus=False, normalize=False, rescale=False
)
