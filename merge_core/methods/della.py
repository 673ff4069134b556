"""DELLA (Deep et al. 2024): magnitude-ranked random drop (MagPrune) with the TIES sign election."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import DELLA_MAGPRUNE

METHOD = task_arithmetic_method("della", sparsifier=DELLA_MAGPRUNE, sign_consensus=True, normalize=True, rescale=True)
