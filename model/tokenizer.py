"""The CLIP BPE tokenizer (vocabulary 49,408, context 77), with the vocabulary open_clip ships in its wheel,
so nothing is fetched from a hub at run time."""

from __future__ import annotations

from functools import lru_cache

import torch

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Start token, BPE ids, end token, zero padding: int64 [len(texts), context_length]. Too-long texts are
    truncated with the end token kept, as CLIP does."""
    if isinstance(texts, str):
        texts = [texts]
    return _clip_tokenizer()(texts, context_length=context_length).long()
