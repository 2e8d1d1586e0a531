"""Method descriptors (issue 14): facts declared at registration, checkpoints of the previous version."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vop
from vop.backbone.checkpoint import build_clip
from vop.backbone.config import CLIPConfig
from vop.engine.optim import param_groups
from vop.methods import count_parameters, create_model, get_method, list_methods, method_facts, plugin_of
from vop.methods.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint

V0 = Path(__file__).parent / "fixtures" / "v0-checkpoints"
METHODS = [m for m in list_methods() if plugin_of(m) is None]  # vop's own (registry-driven: no list of names here)
#: the token-like tensors of vop's prompt modules (a method declares others in its Expected.token_tensors)
TOKEN_LIKE = ("tokens", "shared", "position", "deep", "frame_position", "embedding")
CASES = json.loads((V0 / "cases.json").read_text())


def _micro_backbone():
    arch = CLIPConfig.from_dict(read_checkpoint_meta(V0 / "vop.safetensors")["arch"])
    clip = build_clip(arch, seed=0)
    clip.load_state_dict(load_file(str(V0 / "backbone.safetensors")))
    return clip.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_written_before_the_refactor_load_with_identical_embeddings(case):
    """Every method's checkpoint written by the version before the descriptors (commit 0d5c82e, see
    tests/scripts/make_v0_checkpoints.py) loads: every stored tensor lands bit-identically in the model, and
    the embeddings equal those the old version computed. The embeddings were written on another CPU: float32
    rounding of the same operations differs between CPUs (measured up to 1.6e-6 on an AVX-512 Xeon against
    the fixture), so they are compared at 1e-5; on the machine that wrote them they are bit-identical."""
    inputs, expected = load_file(str(V0 / "inputs.safetensors")), load_file(str(V0 / "expected.safetensors"))
    whole = method_facts(CASES[case]["method"]).whole_model
    model = load_checkpoint(V0 / f"{case}.safetensors", None if whole else _micro_backbone()).eval()
    assert model.name == CASES[case]["method"]
    stored = load_file(str(V0 / f"{case}.safetensors"))
    params = dict(model.named_parameters())
    for name, t in stored.items():
        assert torch.equal(params[name].detach(), t), name
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(inputs["tokens"]), expected[f"{case}.text"], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_video(inputs["video"]), expected[f"{case}.video"], rtol=0, atol=1e-5)


def test_every_method_declares_its_facts():
    labels = set()
    for name in list_methods():
        f = method_facts(name)
        assert f.label and f.label not in labels
        labels.add(f.label)
        assert f.backbone in ("frozen", "part", "all") and f.rates.lr >= 0 and f.demo_rates.lr > 0
    assert [m for m in METHODS if get_method(m).expected is None] == []  # what the shared tests read


@pytest.mark.parametrize("method", METHODS)
def test_declared_backbone_is_what_the_model_trains(method):
    """What the checkpoint code, the trainer and the configs rely on: ``backbone="frozen"`` trains no CLIP
    tensor (default options), ``"all"`` every one (its checkpoint is the whole model), ``"part"`` some."""
    c = count_parameters(method, "tiny", frames=4)
    with torch.device("meta"):
        model = create_model(method, vop.CLIP(vop.get_arch("tiny")), frames=4)
    trained = sum(p.numel() for p in model.clip.parameters() if p.requires_grad)
    want = "frozen" if trained == 0 else "all" if trained == c["backbone"] else "part"
    assert method_facts(method).backbone == want
    assert method_facts(method).whole_model == (trained == c["backbone"])
    assert method_facts(method).trains_backbone == (trained > 0)


@pytest.mark.parametrize("method", METHODS)
def test_no_weight_decay_is_the_models_answer(method):
    """Prompts, embeddings added to tokens, biases, LayerNorms and the logit scale get no weight decay;
    every other trainable tensor does; new tensors use lr and CLIP's own backbone_lr."""
    model = create_model(method, "tiny", frames=4)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = model.no_weight_decay()
    token_like = TOKEN_LIKE + get_method(method).expected.token_tensors
    for n, p in model.named_trainable_parameters():
        expect = p.ndim < 2 or n.rsplit(".", 1)[-1] in token_like or "embedding" in n
        assert (n in no_decay) == expect, n
    for g in param_groups(model, 1e-3, 1e-5, 0.2):
        for p in g["params"]:
            n = names[id(p)]
            assert g["lr"] == (1e-5 if n.startswith("clip.") else 1e-3)
            assert g["weight_decay"] == (0.0 if n in no_decay else 0.2)


def test_a_new_token_tensor_must_be_declared():
    """A module that does not list its tokens in no_weight_decay() gets decay on them (so declare them),
    one that does, does not."""
    from torch import nn

    class Tokens(nn.Module):
        def __init__(self, declare):
            super().__init__()
            self.prompts = nn.Parameter(torch.zeros(3, 4))
            self.declare = declare

        def no_weight_decay(self):
            return {"prompts"} if self.declare else set()

    for declare in (True, False):
        model = create_model("zeroshot", "tiny", frames=4)
        model.extra = Tokens(declare)
        assert ("extra.prompts" in model.no_weight_decay()) == declare


def test_full_checkpoint_needs_no_backbone_and_frozen_ones_do(tmp_path):
    for method in ("full", "vop"):
        model = create_model(method, "tiny", frames=2)
        path = save_checkpoint(model, tmp_path / f"{method}.safetensors")
        if method == "full":
            assert vop.load_checkpoint(path).name == "full"
        else:
            with pytest.raises(vop.errors.CheckpointError, match="holds only prompts"):
                vop.load_checkpoint(path)
