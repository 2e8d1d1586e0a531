"""CLIP's BPE tokenizer (via instant-clip-tokenizer) with CLIP's own text cleaning; SigLIP's tokenizer read
from a file the user gives (:class:`FileTokenizer`, with SigLIP's cleaning, :func:`canonicalize`).

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
import json
import os
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

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


# ------------------------------------------------------------------------------------------------
# SigLIP / SigLIP2: a vocabulary read from a file the user gives
# ------------------------------------------------------------------------------------------------
_PUNCTUATION = str.maketrans("", "", string.punctuation)
#: what a SentencePiece ``.model`` file does not say: the pad id each vocabulary was trained with (open_clip's
#: SigLipTokenizer: Gemma pads with 0; T5's c4-en vocabulary, SigLIP's, pads with its EOS, 1)
_SP_PAD = {"gemma": 0, "t5": 1}
_KINDS = {"gemma": "SigLIP2's Gemma SentencePiece vocabulary (256,000 ids)",
          "t5": "SigLIP's T5 c4-en SentencePiece vocabulary (32,000 ids)"}
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def canonicalize(text: str) -> str:
    """SigLIP's caption cleaning (open_clip's ``clean="canonicalize"``, big_vision's): ftfy, HTML unescaped
    twice, stripped; then "_" -> " ", ASCII punctuation removed, lower-cased, whitespace collapsed."""
    text = require("ftfy", "SigLIP's tokenizer (caption cleaning)", install=_INSTALL).fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def missing_tokenizer(cfg) -> Exception:
    """The ConfigError of a backbone whose tokenizer file was not given: which file, and the three ways to give it."""
    from vop.errors import ConfigError

    return ConfigError(
        f"this {cfg.family} backbone's text tower reads {_KINDS.get(cfg.text.tokenizer, cfg.text.tokenizer)} from a "
        "file, which vop does not ship and never downloads: give the tokenizer.json of the weights' folder (or the "
        "SentencePiece .model): vop.load_clip(path, tokenizer='.../tokenizer.json'), model.tokenizer in a run config, "
        "or --tokenizer on the command line (a tokenizer.json beside the weights file is found by itself)")


def find_tokenizer_file(weights: str | os.PathLike) -> Path | None:
    """A tokenizer file shipped with weights: ``tokenizer.json`` (else ``spiece.model`` / ``tokenizer.model``) in
    the weights' folder (the folder given, or the folder of the file given), as open_clip's and Hugging Face's
    model folders hold it; None if there is none."""
    p = Path(weights)
    folder = p if p.is_dir() else p.parent
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _tokenizer_error(path: Path, why: str) -> Exception:
    from vop.errors import ConfigError

    return ConfigError(f"tokenizer file {path}: {why}")


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=4)
def _json_tokenizer(path: Path, mtime_ns: int, size: int):
    """(tokenizers.Tokenizer with its template, pad id, pad token) of a ``tokenizer.json`` (and the
    ``tokenizer_config.json`` beside it), read as Hugging Face's fast tokenizers read them: the file's
    post-processor is its template unless the config says ``add_bos_token`` / ``add_eos_token`` (then the template
    is [BOS]? text [EOS]?, as transformers rebuilds it); the pad token is the config's ``pad_token``, else the
    file's padding, else ``<pad>``."""
    tokenizers = require("tokenizers", "SigLIP's tokenizer (a tokenizer.json file)", extra="siglip")
    try:
        tk = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # not JSON, not a tokenizer, unknown model type ...
        raise _tokenizer_error(path, f"cannot be read by the tokenizers library ({str(e).splitlines()[0][:200]}); "
                                     "expected a Hugging Face tokenizer.json") from None
    config: dict[str, Any] = {}
    cfg_file = path.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise _tokenizer_error(cfg_file, f"is not JSON ({e})") from None
        if not isinstance(config, dict):
            raise _tokenizer_error(cfg_file, "must be a JSON object")
    if "add_bos_token" in config or "add_eos_token" in config or tk.post_processor is None:
        single, specials = "$A:0", []
        for flag, name, at_end in (("add_bos_token", "bos_token", False), ("add_eos_token", "eos_token", True)):
            token = _token_string(config.get(name))
            tid = tk.token_to_id(token) if token is not None else None
            if config.get(flag) is True and tid is not None:
                single = f"{single} {token}:0" if at_end else f"{token}:0 {single}"
                specials.append((token, tid))
        tk.post_processor = tokenizers.processors.TemplateProcessing(single=single, special_tokens=specials)
    pad = _token_string(config.get("pad_token"))
    padding = tk.padding
    tk.no_truncation()  # truncation and padding are the caller's (FileTokenizer), not the file's
    tk.no_padding()
    pad_id = tk.token_to_id(pad) if pad is not None else None
    if pad_id is None and padding is not None:
        pad, pad_id = padding["pad_token"], padding["pad_id"]
    if pad_id is None:
        pad, pad_id = "<pad>", tk.token_to_id("<pad>")
    if pad_id is None:
        raise _tokenizer_error(path, "names no pad token (tokenizer_config.json pad_token, the file's padding, or a "
                                     "<pad> token): SigLIP's sequences are padded to the text context")
    return tk, int(pad_id), pad


@lru_cache(maxsize=4)
def _sp_tokenizer(path: Path, mtime_ns: int, size: int):
    spm = require("sentencepiece", "SigLIP's tokenizer from a SentencePiece .model file", extra="")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise _tokenizer_error(path, f"cannot be read by sentencepiece ({str(e).splitlines()[0][:200]})") from None


class FileTokenizer:
    """SigLIP's tokenizer: a vocabulary read from a file the user gives, with SigLIP's cleaning
    (:func:`canonicalize`), as open_clip tokenizes for SigLIP / SigLIP2.

    ``path``: a Hugging Face ``tokenizer.json`` (read by the ``tokenizers`` package; its template - SigLIP2:
    text then EOS - and pad token as :func:`_json_tokenizer` reads them) or a SentencePiece ``.model`` (the
    ``sentencepiece`` package; EOS appended, padded with ``kind``'s pad id: Gemma 0, T5 1), told apart by
    content. Every text becomes exactly ``context_length`` ids (SigLIP's text tower is read at its last
    position and its pads take part in attention: the sequence always fills the context), truncated to
    ``budget`` tokens (default: the context) with the template's specials kept, right-padded. An id beyond
    ``vocab_size`` (another model's vocabulary) is a ConfigError naming the file."""

    def __init__(self, path: str | os.PathLike, kind: str = "gemma", context_length: int = 64,
                 budget: int | None = None, vocab_size: int | None = None):
        p = Path(path)
        if p.is_dir():
            found = find_tokenizer_file(p / "x")
            if found is None:
                raise _tokenizer_error(p, f"a folder without {' or '.join(TOKENIZER_FILES)}")
            p = found
        if not p.is_file():
            raise _tokenizer_error(p, "no such file (give the tokenizer.json of the weights' folder, or a "
                                      "SentencePiece .model)")
        if kind not in _SP_PAD:
            raise ValueError(f"tokenizer kind must be one of {', '.join(_SP_PAD)}, got {kind!r}")
        self.path, self.kind, self.vocab_size = p, kind, vocab_size
        self.context_length = context_length
        self.budget = min(budget or context_length, context_length)
        if self.budget < 2:
            raise ValueError(f"a caption budget of {self.budget} leaves no room for a word and the EOS")
        with open(p, "rb") as f:
            head = f.read(64).lstrip()
        self.is_json = head.startswith(b"{")
        st = p.stat()
        self._key = (p.resolve(), st.st_mtime_ns, st.st_size)
        self._backend()  # read (and checked) now: a bad file fails where it is given

    def _backend(self):
        return _json_tokenizer(*self._key) if self.is_json else _sp_tokenizer(*self._key)

    def encode(self, text: str) -> list[int]:
        """The ids of one cleaned text with the template's specials (EOS), truncated to the budget, unpadded."""
        return self._encode([text])[0]

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [canonicalize(t) for t in texts]
        if self.is_json:  # as a fast tokenizer truncates: the text to the budget less the template's specials
            tk, _, _ = self._backend()
            keep = max(self.budget - tk.num_special_tokens_to_add(False), 0)
            out = []
            for e in tk.encode_batch(texts, add_special_tokens=False):
                e.truncate(keep)
                out.append(list(tk.post_process(e).ids))
            return out
        sp = self._backend()
        eos = sp.eos_id() if sp.eos_id() >= 0 else 1
        return [[int(i) for i in sp.encode(t)][: self.budget - 1] + [eos] for t in texts]

    @property
    def pad_id(self) -> int:
        return self._backend()[1] if self.is_json else _SP_PAD[self.kind]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        return self._backend()[0].decode(ids) if self.is_json else self._backend().decode(ids)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = np.full((len(texts), n), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(self._encode(texts)):
            ids = ids[:n]
            out[row, : len(ids)] = ids
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            raise _tokenizer_error(self.path, f"gives id {int(out.max())}, beyond the text tower's vocabulary of "
                                              f"{self.vocab_size:,}: it is not this backbone's tokenizer")
        return torch.from_numpy(out)
