"""CLIP's BPE tokenizer (via instant-clip-tokenizer) with CLIP's own text cleaning.

OpenAI's tokenizer runs ``ftfy.fix_text``, ``html.unescape`` twice, collapses whitespace and
lower-cases before BPE; instant-clip-tokenizer only lower-cases, so the cleaning is done here.
When a method inserts ``n`` prompt tokens into the text sequence, the caption budget shrinks to
``context_length - n``; over-long captions are truncated keeping [SOT] first and [EOT] last, as
``clip.tokenize(..., truncate=True)`` does.
"""
from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Sequence

import ftfy
import numpy as np
import torch

SOT, EOT = 49406, 49407


def clean_text(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower()


@lru_cache(maxsize=1)
def _bpe():
    from instant_clip_tokenizer import Tokenizer

    return Tokenizer()


class CLIPTokenizer:
    """Callable: ``tokenizer(texts) -> LongTensor (len(texts), context_length)``, zero-padded."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context length {context_length} leaves no room for [SOT] and [EOT]")
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of one cleaned text, without [SOT]/[EOT]."""
        return list(_bpe().encode(clean_text(text)))

    def decode(self, ids: Sequence[int]) -> str:
        return _bpe().decode([int(i) for i in ids if int(i) not in (0, SOT, EOT)])

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = np.zeros((len(texts), n), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: n - 2]
            out[row, 0] = SOT
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = EOT
        return torch.from_numpy(out)
