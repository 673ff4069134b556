"""TIES (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign, average agreeing entries."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method
from merge_core.methods.sparsify import MAGNITUDE

METHOD = task_arithmetic_method("ties", sparsifier=MAGNITUDE, sign_consensus=True, normalize=True, rescale=False)
