"""The merge core inside vLLM's engine: mixed into every engine worker (vLLM's `worker_extension_cls`).

A candidate reaches the engine as its recipe (a few KB of YAML through `collective_rpc`), never as weights:
each worker keeps the sources resident on its own device and streams the merged tensors one at a time into
vLLM's `reload_weights`, which applies the model's fused layouts, CPU repacking and tensor-parallel slicing
layer by layer. So a swap makes no scratch file, no serialization and no host round trip, and holds at most
one merged tensor beyond what the engine itself holds while vLLM processes a layer.
"""

from collections.abc import Iterator, Sequence

import torch

from merge_core import InputError, MergeSession, Recipe


class EngineMerge:
    """Methods for `evaluators.vllm_backend.swap_weights`; `self` is a vLLM worker (it has `model_runner`)."""

    def evomerge_open(self, models: Sequence[str], lean: bool) -> str:
        """Load the sources once, on this worker's device; answers the device, for the worker's log."""
        device = str(self.model_runner.device)
        self.evomerge_session = MergeSession(list(models), device=device, lean=lean)
        return device

    def evomerge_apply(self, recipe_yaml: str, seed: int) -> None:
        recipe = Recipe.from_yaml(recipe_yaml)
        self.model_runner.reload_weights(weights_iterator=self._finite(recipe, seed))
        # vLLM processes each layer once its weights are loaded; a tied lm_head loads none (it shares the
        # embedding's), so on CPU it kept the packed copy made from the engine's first weights: every candidate
        # was scored with the base's output head. Processing it again repacks it (a no-op on GPU).
        model = self.model_runner.get_model()
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)

    def _finite(self, recipe: Recipe, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        session = self.evomerge_session
        for name, tensor in session.merged_tensors(session.plan(recipe), seed):
            if not torch.isfinite(tensor).all():
                raise InputError(recipe.where, None, f"merged tensor {name} has NaN or infinite values")
            yield name, tensor
