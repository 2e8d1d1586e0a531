import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A command run in-process (`vop demo --threads 1`) sets torch's thread count for the process:
    restore it, so that later tests reduce in the same order (bit-exact comparisons depend on it)."""
    yield
    if torch.get_num_threads() != _THREADS:
        torch.set_num_threads(_THREADS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The smoke-size synthetic world (48 training pairs: 6 steps of 8), one per test module (tests may
    damage it); a module defines its own ``world`` where it needs another."""
    from vop.data import generate_world

    d = tmp_path_factory.mktemp("world")
    generate_world(d, size="smoke")
    return d


@pytest.fixture
def videos(world, tmp_path):
    """A private copy of the smoke world's 16 test videos (tests add, change and remove files)."""
    import shutil

    d = tmp_path / "vids"
    shutil.copytree(world / "videos" / "test", d)
    return d


@pytest.fixture(scope="session")
def tiny_clip():
    """A random tiny CLIP (width 64, 2 layers, 32 px), deterministic."""
    from vop.backbone import build_clip

    return build_clip("tiny", seed=0).eval()


@pytest.fixture
def video_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 3, 32, 32, generator=g)


@pytest.fixture
def token_batch():
    from vop.backbone import CLIPTokenizer

    return CLIPTokenizer(16)(["a red circle moving left", "the square turns blue, then the circle moves up", "x"])


@pytest.fixture(scope="session")
def siglip_tokenizer(tmp_path_factory):
    """A tiny SigLIP2-style tokenizer.json (Unigram, text then <eos>, pad 0; tests/tokenizer_files.py), for the
    siglip-tiny record (vocabulary 1000)."""
    import tokenizer_files

    return tokenizer_files.tiny_tokenizer(tmp_path_factory.mktemp("siglip_tokenizer"))
