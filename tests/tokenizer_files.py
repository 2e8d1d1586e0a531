"""Tiny tokenizer files for SigLIP's tokenizer tests, built here with the ``tokenizers`` library (a small
Unigram model, SentencePiece's algorithm, as Gemma's and T5's vocabularies are): ``tokenizer.json`` with
SigLIP2's template (the text, then EOS) and a ``tokenizer_config.json`` as Hugging Face writes one. Nothing
is downloaded; tests skip (naming the package) without ``tokenizers``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

#: Gemma's first ids: pad 0, eos 1, bos 2, unk 3 (SigLIP2); the tiny vocabulary stays below VOCAB
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = 1000
CORPUS = [
    "a red circle moving left", "the square turns blue, then the circle moves up", "a dog jumps into a pool",
    "a man is playing a guitar on stage", "two people are cooking food in a kitchen", "a cat sleeps on the sofa",
    "the green triangle grows and shrinks", "a car drives down a busy street at night", "children play football",
    "a woman sings a song while the band plays", "someone slices vegetables with a knife", "birds fly over the sea",
    "the blue square slides right", "a yellow star spins slowly", "an orange circle bounces twice",
]


def require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        pytest.skip("the tokenizers package is not installed (it comes with transformers: pip install -e '.[dev]')")
    return tokenizers


def tiny_tokenizer(folder: Path, *, add_eos_in_config: bool | None = True, template: str = "$A <eos>",
                   vocab_size: int = 200) -> Path:
    """A Unigram ``tokenizer.json`` (Metaspace pre-tokenizer, as SentencePiece) trained on :data:`CORPUS`, its
    post-processor ``template``, and a ``tokenizer_config.json`` (pad ``<pad>``, eos ``<eos>``, right padding;
    ``add_eos_token``/``add_bos_token`` written unless ``add_eos_in_config`` is None). Returns the json's path."""
    tk_lib = require_tokenizers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>",
                                      shrinking_factor=0.75)
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    specials = [(t, tk.token_to_id(t)) for t in ("<eos>", "<bos>") if t in template]
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    path = folder / "tokenizer.json"
    tk.save(str(path))
    config = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
              "padding_side": "right", "model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}
    if add_eos_in_config is not None:
        config.update(add_bos_token=False, add_eos_token=add_eos_in_config)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert tk.get_vocab_size() <= VOCAB and tk_lib
    return path
