"""Greedy exact match by teacher forcing: one forward pass per item instead of `generate`.

An answer is right iff the argmax is the right token at every answer position and at the EOS after it,
which is exactly what greedy decoding would produce (and what lm-eval's loglikelihood `acc` measures).
"""

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from evaluators.toy_family.splits import Item
from evaluators.toy_family.training import IGNORE, collate


@torch.no_grad()
def exact_match(model: PreTrainedModel, items: Sequence[Item], batch_size: int = 256) -> list[bool]:
    """Per item: does greedy decoding of `prompt` give exactly `answer` followed by EOS."""
    model.eval()
    correct: list[bool] = []
    for start in range(0, len(items), batch_size):
        inputs, targets = collate(items[start : start + batch_size])
        predicted = model(input_ids=inputs).logits.argmax(-1)
        scored = targets != IGNORE
        correct.extend(((predicted == targets) | ~scored).all(dim=1).tolist())
    return correct


def accuracy(model: PreTrainedModel, items: Sequence[Item]) -> float:
    hits = exact_match(model, items)
    return sum(hits) / len(hits)
