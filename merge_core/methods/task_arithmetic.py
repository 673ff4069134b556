"""Task arithmetic (Ilharco et al. 2022): base plus the weighted sum of task vectors."""

from merge_core.methods.generalized_task_arithmetic import task_arithmetic_method

METHOD = task_arithmetic_method(
    "task_arithmetic", sparsifier=None, sign_consensus=False, normalize=False, rescale=False
)
