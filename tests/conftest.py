"""Session fixtures: model families built once per test session and shared by every test."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def toy_family():
    """The trained char-level toy family (test size), built once and cached across sessions."""
    from evaluators.toy_family import build_family

    return build_family(size="test")


@pytest.fixture(scope="module")
def lm(toy_family):
    """The toy base wrapped for lm-eval once per module, with the eval config that scored it (subset seed 1234)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import EvalConfig, hf_lm

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(toy_family.base)
    tokenizer = AutoTokenizer.from_pretrained(toy_family.base)
    config = EvalConfig(include_path=toy_family.tasks_dir, batch_size=64, subset_seed=1234)
    return hf_lm(model, tokenizer, config), config


def save_char_tokenizer(directory) -> None:
    """A minimal char-level tokenizer so the tiny family's checkpoints are complete HF model directories."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 =+:")
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)


def make_tiny_family(
    root, *, tie_embeddings: bool, children: int = 3, layers: int = 4, hidden: int = 32, vocab: int = 48
) -> dict:
    """A random tiny Llama base and children = base + small per-tensor deltas, like real fine-tunes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {}
    for index, name in enumerate(["base"] + [f"child{i}" for i in range(children)]):
        model = base if index == 0 else LlamaForCausalLM(config)
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for (_, target), (_, source) in zip(model.named_parameters(), base.named_parameters(), strict=True):
                    noise = torch.randn(source.shape, generator=generator)
                    target.copy_(source + 0.05 * source.std().clamp_min(0.01) * noise)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        save_char_tokenizer(paths[name])
    return paths


CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHARS = 44  # the char tokenizer's size, which a vocabulary family's base vocab_size matches


def with_tokens(source: str, target, special: list[str], plain: tuple[str, ...] = (), seed: int = 0) -> str:
    """A copy of `source` with `special` and `plain` tokens added and its token-indexed tensors resized, the way
    a fine-tune grows its vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.add_tokens(list(plain))
    model = AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(seed)  # transformers draws the new rows around the mean of the old ones
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def make_vocab_family(root) -> dict[str, str]:
    """base and two fine-tunes whose vocabularies differ: `chat` adds the ChatML tokens, `tool` adds them and one
    plain token more."""
    f = make_tiny_family(root, tie_embeddings=False, children=2, layers=2, vocab=CHARS)
    f["chat"] = with_tokens(f["child0"], root / "chat", CHATML_TOKENS, seed=1)
    f["tool"] = with_tokens(f["child1"], root / "tool", CHATML_TOKENS, ("<tool>",), seed=2)
    return {name: f[name] for name in ("base", "chat", "tool")}


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """base, child0..child2 with untied embeddings (lm_head is its own tensor)."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny"), tie_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tied_family(tmp_path_factory):
    """The same shape of family with tied embeddings (checkpoints hold no lm_head.weight)."""
    return make_tiny_family(tmp_path_factory.mktemp("tiny_tied"), tie_embeddings=True, children=2, layers=3)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """A sqlite MLflow store shared by a test module (creating one costs ~5 s); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
