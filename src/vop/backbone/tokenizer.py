"""CLIP's BPE tokenizer (via instant-clip-tokenizer) with CLIP's own text cleaning.

OpenAI's tokenizer runs ``ftfy.fix_text``, ``html.unescape`` twice, collapses whitespace and
lower-cases before BPE; instant-clip-tokenizer only lower-cases, so the cleaning is done here.
When a method inserts ``n`` prompt tokens into the text sequence, the caption budget shrinks to
``context_length - n``; over-long captions are truncated keeping [SOT] first and [EOT] last, as
``clip.tokenize(..., truncate=True)`` does.

ftfy and instant-clip-tokenizer are imported on first use (``import vop`` and the models need
neither); without them, tokenizing raises :class:`vop.errors.MissingDependencyError` naming them.
"""
from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from vop._optional import require

SOT, EOT = 49406, 49407
_INSTALL = "ftfy instant-clip-tokenizer"  # what the tokenizer needs, named in its error


def clean_text(text: str) -> str:
    text = require("ftfy", "CLIP's tokenizer (caption cleaning)", install=_INSTALL).fix_text(text)
    text = html.unescape(html.unescape(text))
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower()


@lru_cache(maxsize=1)
def _bpe():
    return require("instant_clip_tokenizer", "CLIP's tokenizer (BPE)", package="instant-clip-tokenizer",
                   install=_INSTALL).Tokenizer()


class CLIPTokenizer:
    """Callable: ``tokenizer(texts) -> LongTensor (len(texts), context_length)``, zero-padded."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context length {context_length} leaves no room for [SOT] and [EOT]")
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of one cleaned text, without [SOT]/[EOT]."""
        text = clean_text(text)
        return list(_bpe().encode(text))

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
