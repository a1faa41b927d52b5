"""A byte-level tokenizer that needs no vocabulary file: the tiny presets' stand-in for T5's.

No package on PyPI ships T5's sentencepiece model and hubs are unreachable in CI, so tiny presets
use 256 byte tokens plus T5's three specials (pad=0, eos=1, unk=2), wrapped as a transformers
fast tokenizer so pipelines call it exactly like the real one.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    # alphabet() comes back in set order, which changes from process to process: sort it, or token
    # ids (and every cached text embedding) would differ between prep, training and inference.
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok.to_str()


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
    )


def byte_vocab(head: tuple[str, ...] = (), tail: tuple[str, ...] = ()) -> dict[str, int]:
    """`head` specials, the 256 byte tokens in sorted order, then `tail` specials: the same ids in
    every process (alphabet() comes back in set order, which changes from process to process)."""
    vocab = {tok: i for i, tok in enumerate(head)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    for tok in tail:
        vocab.setdefault(tok, len(vocab))
    return vocab


def chat_tokenizer(tokenizer_json: str, chat_template: str, **specials: object) -> PreTrainedTokenizerFast:
    """A tiny VLM's tokenizer: the serialised byte-level BPE (`byte_level_bpe(...).to_str()`, cached by the
    caller), its special-token roles and model_max_length (`specials`), and the family's chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **specials)
    tok.chat_template = chat_template
    return tok


def byte_level_bpe(head: tuple[str, ...] = (), tail: tuple[str, ...] = (), unk: str | None = None) -> Tokenizer:
    """A vocabulary-file-free byte-level tokenizer with the given specials registered as special
    tokens and no post-processor (callers add their model's BOS/EOS convention)."""
    tok = Tokenizer(models.BPE(vocab=byte_vocab(head, tail), merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head + tail])
    return tok
