"""A character-level tokenizer built locally with the `tokenizers` library: the tokenizer of the
reference trainer's tiny models and of the TRL tests (`metactl.adapters.trl.testing`), shared
by both without one integration importing the other.

Every character of the alphabet is one token; four special tokens (`<pad>`, `<eos>`, `<bos>`,
`<unk>`) come first. The result is a regular `transformers.PreTrainedTokenizerFast`, so it can be
saved with `save_pretrained` and reloaded with `AutoTokenizer.from_pretrained`.

Example:
    >>> tok = build_char_tokenizer("0123456789+-*,=.")
    >>> tok("12+3").input_ids
    [5, 6, 14, 7]
    >>> tok.decode([5, 6, 14, 7, tok.eos_token_id], skip_special_tokens=True)
    '12+3'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")


def build_char_tokenizer(alphabet: str, *, prepend_bos: bool = False) -> PreTrainedTokenizerFast:
    """Return a char-level `PreTrainedTokenizerFast` over `alphabet` (left padding).

    Ids: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, then the alphabet's characters in order.
    No special tokens are added automatically unless `prepend_bos` (then every encoded text
    starts with `<bos>`); decoding joins characters without spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError("alphabet must be a non-empty string")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    if prepend_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )
