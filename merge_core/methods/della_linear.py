"""Linear DELLA: MagPrune, then a plain weighted sum."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import DELLA_MAGPRUNE

METHOD = task_arithmetic_method(
    "della_linear", sparsifier=DELLA_MAGPRUNE, sign_consensus=False, normalize=False, rescale=True
)
