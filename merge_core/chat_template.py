"""A recipe's `chat_template:`, chosen and written into the merged tokenizer as mergekit 0.1.5 does it.

`auto` takes the template most of the merged models' tokenizers carry (compared stripped, as mergekit compares
them); `chatml` is the ChatML template; any other value is the Jinja text itself. The merged tokenizer is then
loaded and saved again through transformers instead of copied, which is how mergekit writes it, so the files
(tokenizer_config.json, chat_template.jinja) are the same. mergekit also names alpaca, llama3, mistral and exaone
templates: their texts are mergekit's own LGPL files, which evomerge does not copy, so those names are refused.
"""

import copy
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_core.errors import shown

logger = logging.getLogger(__name__)

# The ChatML template transformers used as its default (Apache-2.0), on the two lines mergekit's chatml.jinja
# puts it, trailing newline included: the written chat_template.jinja must match mergekit's byte for byte.
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
)
NAMED = {"chatml": CHATML}
MERGEKIT_NAMED = ("alpaca", "llama3", "mistral", "exaone")
EXPECTED = "expected auto, chatml, or the Jinja text of a template (20 characters or more, with a '{')"


def check_chat_template(raw: object) -> str:
    """The recipe's value as written, if mergekit would take it; ValueError saying what is expected otherwise."""
    if raw in MERGEKIT_NAMED:
        raise ValueError(f"{raw!r} is a template mergekit ships and evomerge does not: give its Jinja text instead")
    # mergekit's own rule for telling a template's text from a typo'd name.
    if not isinstance(raw, str) or not (raw == "auto" or raw in NAMED or (len(raw) >= 20 and "{" in raw)):
        raise ValueError(f"{EXPECTED}, got {shown(raw)}")
    return raw


def template_text(setting: str, model_dirs: Sequence[Path]) -> str | None:
    """The Jinja text `setting` stands for; for `auto`, the most common template of `model_dirs`' tokenizers
    (a tie goes to the first in `model_dirs`, where mergekit's pick depends on set order), None when none has one."""
    if setting != "auto":
        return NAMED.get(setting, setting)
    templates = [template for template in map(_own_template, model_dirs) if template]
    return Counter(templates).most_common(1)[0][0] if templates else None


def _own_template(model_dir: Path) -> str | None:
    from transformers import AutoTokenizer  # only recipes with a chat template pay for the import

    try:
        template = AutoTokenizer.from_pretrained(model_dir).chat_template
    except (OSError, ValueError) as error:
        # mergekit too passes over a model whose tokenizer does not load.
        logger.warning("%s: no tokenizer to read a chat template from, so auto passes it over (%s)", model_dir, error)
        return None
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default")
    return template.strip() if template else None


def save_tokenizer(source_dir: Path, out_dir: Path, template: str) -> None:
    """The tokenizer of `source_dir` with `template`, saved into `out_dir` as transformers writes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)


def save_built_tokenizer(tokenizer: Any, out_dir: Path, template: str | None) -> None:
    """A built tokenizer (a tokenizer merge's) saved into `out_dir`, with `template` when given; a copy is given
    the template, so the one a session keeps for its other recipes stays as it is."""
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
