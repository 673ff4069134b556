"""Character-level tokenizer of the toy family: one token per character, BOS added on encode."""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:%,.|<> "
VOCAB = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer every toy checkpoint ships with.

    BOS is added by the post-processor, so `tokenizer(text)` gives exactly what the models were trained on
    and lm-eval's HFLM (which encodes context and context+continuation with special tokens) splits the
    pair at the same token boundary as the trainer.
    """
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=64,
    )


def encode(text: str) -> list[int]:
    """BOS + one id per character; the trainer's fast path, equal to `build_tokenizer()(text).input_ids`."""
    return [BOS_ID, *(VOCAB.get(ch, UNK_ID) for ch in text)]


def save_tokenizer(directory: Path) -> None:
    build_tokenizer().save_pretrained(directory)
