"""Locally trained tokenizers for tiny policies (no hub downloads).

Tests, benchmarks and the scripted tasks need a tokenizer that is small, deterministic and built offline.
The Search-R1 protocol tags are single, *non-special* tokens: they must survive
`decode(..., skip_special_tokens=True)` because the environment parses them from the decoded step text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PROTOCOL_TAGS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<information>",
    "</information>",
    "<answer>",
    "</answer>",
)
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IM_START, IM_END)

# ChatML-like: simple, and the generation prompt ends with a newline so the reply starts cleanly.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_HERMES_HEADER = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
)
_HERMES_FOOTER = (
    "\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_chat_template(header: str = _HERMES_HEADER, footer: str = _HERMES_FOOTER) -> str:
    """The tool-aware ChatML template with the given instruction text around the ``<tools>`` block."""
    return (
        "{% set ns = namespace(skip=false) %}"
        "{% if tools %}<|im_start|>system\n"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] }}{{ '\n\n' }}{% set ns.skip = true %}{% endif %}"
        + header
        + "<tools>{% for t in tools %}{{ '\n' }}{{ t | tojson }}{% endfor %}{{ '\n' }}</tools>"
        + footer
        + "<|im_end|>\n"
        "{% endif %}"
        "{% for m in messages %}"
        "{% if loop.first and ns.skip %}"
        "{% elif m['role'] == 'tool' %}"
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
        "{{ '\n' }}<tool_response>{{ '\n' }}{{ m['content'] }}{{ '\n' }}</tool_response>"
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>{{ '\n' }}{% endif %}"
        "{% else %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['tool_calls'] is defined and m['tool_calls'] %}{% for c in m['tool_calls'] %}"
        "{% set f = c['function'] if c['function'] is defined else c %}"
        "{% if not loop.first or m['content'] %}{{ '\n' }}{% endif %}"
        "<tool_call>{{ '\n' }}{{ {'name': f['name'], 'arguments': f['arguments']} | tojson }}{{ '\n' }}</tool_call>"
        "{% endfor %}{% endif %}"
        "<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# The same ChatML, tool-aware in the Hermes / Qwen2.5 style: `tools=` are listed in a system block as
# JSON schemas, calls are `<tool_call>{"name", "arguments"}</tool_call>`, and consecutive tool
# results form one user turn of `<tool_response>` blocks. Without tools and tool messages it renders
# exactly like CHAT_TEMPLATE. Prefix-preserving: no earlier turn is ever re-rendered differently.
# (Transformers compiles templates with trim_blocks, so newlines after a block tag are written {{ '\n' }}.)
TOOLS_CHAT_TEMPLATE = tools_chat_template()
# The tiny model's: the same layout with a one-word header (it reads the prompt on every step and learns
# the call format from demonstrations, not from instructions).
TINY_TOOLS_CHAT_TEMPLATE = tools_chat_template(header="Tools:\n", footer="")

# Word-level pieces: a word or number with at most one leading space, one punctuation char, or one
# whitespace char. Concatenating the pieces gives back the text exactly, so decoding is a plain join.
_WORD_PATTERN = r" ?[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]|\s"
_BARE_WORD = re.compile(r"\w+")


def train_tokenizer(
    texts: Iterable[str],
    kind: Literal["wordlevel", "bpe"] = "wordlevel",
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    extra_tokens: Sequence[str] = (),
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts` and wrap it for transformers.

    `wordlevel`: one token per word (leading space included), punctuation char or whitespace char; unseen
    words map to `<unk>`. Text made of seen words round-trips exactly. `bpe`: byte-level BPE, round-trips
    any text. Protocol tags and `extra_tokens` (e.g. entity names) are added as single non-special tokens.
    """
    if kind not in ("wordlevel", "bpe"):
        raise ValueError(f"kind must be 'wordlevel' or 'bpe', got {kind!r}")
    specials = list(dict.fromkeys([PAD, UNK, BOS, EOS, IM_START, IM_END, *special_tokens]))
    texts = list(texts)
    if kind == "wordlevel":
        # A word at a line start has no leading space: also teach every word (and the chat roles) bare ...
        texts = [*texts, "system\nuser\nassistant"]
        words = ["\n".join(_BARE_WORD.findall(t)) for t in texts]
        texts += words + [" " + w.replace("\n", " ") for w in words]  # ... and space-prefixed
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials
        )
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    # Protocol tags / extra tokens: added before training so the trainer never splits them.
    plain = [t for t in dict.fromkeys([*PROTOCOL_TAGS, *extra_tokens]) if t not in specials]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.train_from_iterator(texts, trainer=trainer)
    # train_from_iterator may reorder; re-adding is a no-op for existing tokens.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` with our special tokens and chat template."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=IM_END,  # a chat model ends its turn with <|im_end|>
        additional_special_tokens=[EOS, IM_START],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = TINY_TOOLS_CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf
