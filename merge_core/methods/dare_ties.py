"""DARE-TIES (Yu et al. 2023): random drop with L1 rescale, then the TIES sign election."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import RANDOM

METHOD = task_arithmetic_method("dare_ties", sparsifier=RANDOM, sign_consensus=True, normalize=False, rescale=True)
