"""Tiny Llamas and the loop that trains them: loss on the answer and EOS only, AdamW, warmup then cosine."""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evaluators.toy_family.splits import Item
from evaluators.toy_family.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode

IGNORE = -100
MAX_POSITIONS = 64


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class TrainRecipe:
    steps: int
    lr: float
    weight_decay: float
    warmup: int
    batch_size: int = 64
    final_lr_fraction: float = 0.1  # cosine decays to 10% of lr, not to 0: the last steps still learn


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def new_model(arch: Architecture, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=arch.hidden,
        intermediate_size=arch.ffn,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def collate(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, targets); targets are IGNORE except at the answer tokens and the final EOS.

    Right padding needs no attention mask: causal attention never lets a real token see the padding after it.
    """
    sequences = [(encode(prompt + answer) + [EOS_ID], len(prompt) + 1) for prompt, answer in items]
    width = max(len(seq) for seq, _ in sequences) - 1
    inputs = torch.full((len(items), width), PAD_ID)
    targets = torch.full((len(items), width), IGNORE)
    for row, (seq, prompt_len) in enumerate(sequences):
        inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        # Position i predicts token i + 1, so the first answer token is predicted at prompt_len - 1.
        targets[row, prompt_len - 1 : len(seq) - 1] = torch.tensor(seq[prompt_len:])
    return inputs, targets


def _lr_factor(step: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    floor = recipe.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# on_progress(stage, done, total): "training base" 1200 of 3000 steps, say; a plain callable, so evaluators/ need
# not know who displays it.
OnProgress = Callable[[str, int, int], None]


def silent(*_: object) -> None:
    """The default progress callback: report nothing."""


def train(
    model: LlamaForCausalLM, stream: Iterator[Item], recipe: TrainRecipe, on_step: Callable[[int, int], None] = silent
) -> list[float]:
    """Full fine-tuning of every parameter; returns the loss of each step. `on_step(done, total)` follows each step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    losses = []
    for step in range(recipe.steps):
        inputs, targets = collate(list(islice(stream, recipe.batch_size)))
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        on_step(step + 1, recipe.steps)
    model.eval()
    return losses
