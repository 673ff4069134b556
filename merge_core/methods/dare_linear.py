"""Linear DARE (Yu et al. 2023): random drop with L1 rescale, then a plain weighted sum."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import RANDOM

METHOD = task_arithmetic_method("dare_linear", sparsifier=RANDOM, sign_consensus=False, normalize=False, rescale=True)
