"""The evaluation workspace: what one scoring forward pass holds beyond the weights, from config.json alone.

lm-eval's HF backend runs a batch of requests padded to its longest, with no gradients, and keeps
    logits         batch x tokens x vocab, which it turns into float32 log-probs (a second copy)
    the KV cache   every layer's keys and values, which a forward returns unless told otherwise
    activations    the widest intermediate of one layer (the MLP's), input and output side by side
so the bound below takes the longest a batch can be: lm-eval truncates requests to max_length (its
model_args, else the model's max_position_embeddings). Real batches are usually far shorter: this is an upper
bound for a warning, never a reason to refuse a run.
"""

from dataclasses import dataclass

from merge_core.architecture import text_config

DEFAULT_MAX_LENGTH = 2048  # lm-eval's when the config names no context length
FLOAT32 = 4


@dataclass(frozen=True)
class Workspace:
    batch: int
    tokens: int  # per request, the longest lm-eval feeds
    bytes: int


def workspace(config: dict, batch_size: int | str, max_length: int | None, itemsize: int) -> Workspace:
    """The bound for one forward of `batch_size` requests ('auto': lm-eval sizes it to fit, so one) with
    weights and activations of `itemsize` bytes."""
    model = text_config(config)
    batch = 1 if batch_size == "auto" else int(batch_size)
    tokens = int(max_length or model.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
    hidden, layers, vocab = model["hidden_size"], model["num_hidden_layers"], model["vocab_size"]
    heads = model.get("num_attention_heads", 1)
    head_dim = model.get("head_dim") or hidden // heads
    kv_width = 2 * model.get("num_key_value_heads", heads) * head_dim  # keys and values
    widest = max(model.get("intermediate_size", 4 * hidden), hidden)
    logits = vocab * (itemsize + FLOAT32)
    per_token = logits + layers * kv_width * itemsize + 2 * widest * itemsize
    return Workspace(batch, tokens, batch * tokens * per_token)
