"""The authors' released models (ModelScope folders) load and give the outputs of their code.

Folders are built in the released layout from random weights on the tiny architecture and compared
with an independent re-implementation of the authors' forward pass (tests/modelscope_reference.py).
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vop
from vop.backbone import build_clip
from vop.errors import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
import modelscope_reference as ref  # noqa: E402

HYPER = {"vp_token_num": 3, "tp_prefix_token_num": 2, "tp_suffix_token_num": 2, "num_frames": 4, "input_res": 32,
         "pooling_type": "avg", "seed": 0, "topk": 1, "video_sample_type": "uniform"}
TEXTS = ["a red circle moving left", "x", " ".join(["the green square turns blue"] * 20)]  # the last fills the budget


def _backbone_sd():
    """Random tiny CLIP with non-trivial LayerNorms (as trained ones are: with identity affine maps,
    normalising the video prompts by ln_pre before ln_1 would change nothing)."""
    sd = {k: v.clone() for k, v in build_clip("tiny", seed=0).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if ".ln_" in f".{k}" and v.dim() == 1:
            v += 0.3 * torch.randn(v.shape, generator=g)
    return sd


def make_folder(root: Path, layout: str = "vop", state: dict | None = None, hyper: dict | None = None) -> Path:
    """A folder as released: configuration.json, ViT-B-32.pt (here a plain state dict), the weights."""
    root.mkdir(parents=True, exist_ok=True)
    sd = _backbone_sd()
    torch.save(sd, root / "ViT-B-32.pt")
    kind = "vop-retrieval-model" if layout == "vop" else "vop-retrieval-model-se"
    cfg = {"framework": "pytorch", "task": "vop-retrieval", "model": {"type": kind},
           "pipeline": {"type": "vop-video-text-retrieval"}, "hyperparam": hyper or HYPER}
    (root / "configuration.json").write_text(json.dumps(cfg))
    if state is None:
        state = vop_state(sd) if layout == "vop" else {f"clip.{k}": v for k, v in sd.items()}
    torch.save({"state_dict": state, "epoch": 5}, root / ("VoP_msrvtt9k.pth" if layout == "vop" else "VoPSE_msrvtt9k.pth"))
    return root


def vop_state(sd):
    """The authors' VoP state dict: prompts plus the CLIP copies the port's modules hold (DataParallel names)."""
    g = torch.Generator().manual_seed(1)
    state = {"visual_prompt_learner.visual_prompts": torch.randn(2, 1, 3, 64, generator=g),
             "text_prompt_learner.text_prompts": torch.randn(2, 4, 64, generator=g)}
    for k, v in sd.items():
        state[f"clip.{k}"] = v
        if k.startswith("visual."):
            state[f"image_encoder.{k[len('visual.'):]}"] = v
        elif k != "logit_scale":
            state[f"text_encoder.{k}"] = v
    return {f"module.{k}": v for k, v in state.items()}


@pytest.fixture(scope="module")
def vop_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ms") / "cv_vit-b32_retrieval_vop")


@pytest.fixture
def video():
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_vop_folder_matches_the_authors_forward(vop_folder, video):
    model = vop.load_checkpoint(vop_folder).eval()
    assert model.name == "vop" and model.frames == 4
    assert model.options_dict() == {"n_text": 4, "n_video": 3, "depth": None, "prompt_from": "input", "semantics": "modelscope", "n_text_suffix": 2}
    assert (model.clip.cfg.vision.heads, model.clip.cfg.text.heads) == (1, 1)  # the authors' width // 64
    tok = model.tokenizer()
    tokens = tok(TEXTS)
    assert tokens.shape == (3, 73) and torch.equal(tokens, ref.tokenize(tok.encode, TEXTS, 73))
    assert tokens[2, -1] == 49407  # the long caption fills the budget: [EOT] last
    near = tokens[2].clone()
    near[-2:] = torch.tensor([49407, 0])  # [EOT] one short of the end: their read-out hits a suffix prompt's slot
    tokens = torch.cat([tokens, near[None]])

    sd = _backbone_sd()
    pth = torch.load(vop_folder / "VoP_msrvtt9k.pth", weights_only=True)["state_dict"]
    vp, tp = pth["module.visual_prompt_learner.visual_prompts"], pth["module.text_prompt_learner.text_prompts"]
    with torch.no_grad():
        want_t, want_v = ref.vop_text(sd, tp, 2, tokens), ref.vop_video(sd, vp, video)
        t, v = model.encode_text(tokens), model.encode_video(video)
        assert torch.allclose(F.normalize(t, dim=-1), want_t, atol=1e-5)
        assert torch.allclose(v, want_v, atol=1e-5)
        assert torch.allclose(model.similarity(t, v), want_t @ F.normalize(want_v, dim=-1).t(), atol=1e-5)
        # shorter token rows (max_words) are zero-padded to the authors' length: same embeddings
        assert torch.allclose(model.encode_text(model.tokenizer(max_words=16)(TEXTS[:2])), t[:2], atol=1e-6)

        # our own semantics on the same weights give other outputs (the test would catch a mix-up)
        ours = vop.create_model("vop", model.clip, frames=4, n_text=4, n_video=3)
        ours.text_prompts.tokens.copy_(model.text_prompts.tokens)
        ours.video_prompts.source.shared.copy_(model.video_prompts.source.shared)
        assert (F.normalize(ours.encode_text(tokens), dim=-1) - want_t).abs().max() > 1e-3
        assert (ours.encode_video(video) - want_v).abs().max() > 1e-3

    # it trains like any method: every prompt gets a gradient (layer 0's video prompts through ln_pre)
    (model.encode_text(tokens).square().sum() + model.encode_video(video).square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum(dim=-1).min() > 0 for p in model.trainable_parameters())
    # the model saves and reloads as our own prompt checkpoint, semantics included
    back = vop.load_checkpoint(vop.save_checkpoint(model, vop_folder.parent / "p.safetensors"), model.clip)
    with torch.no_grad():
        assert torch.equal(back.encode_text(tokens), t)


@pytest.mark.parametrize("tuned,method", [
    ((), "zeroshot"),
    (("visual.proj", "text_projection"), "proj"),
    (("visual.ln_pre.bias", "transformer.resblocks.1.mlp.c_fc.bias"), "bias"),
    (("visual.transformer.resblocks.0.attn.in_proj_bias", "ln_final.bias"), "bias"),  # attention_qkv
    (("transformer.resblocks.0.attn.in_proj_weight",), "full"),
])
def test_vopse_folder_is_clip_with_the_tuned_weights(tmp_path, video, tuned, method):
    sd = _backbone_sd()
    g = torch.Generator().manual_seed(3)
    for k in tuned:
        sd[k] = sd[k] + torch.randn(sd[k].shape, generator=g)
    sd["logit_scale"] = sd["logit_scale"] + 1  # changes no embedding: not a reason to call it full
    folder = make_folder(tmp_path / "cv_vit-b32_retrieval_vop_x", "se", {f"module.clip.{k}": v for k, v in sd.items()},
                         {"num_frames": 4, "input_res": 32, "pooling_type": "avg", "tp_prefix_token_num": 0,
                          "tp_suffix_token_num": 0})
    meta = vop.read_checkpoint_meta(folder)
    model = vop.load_checkpoint(folder).eval()
    assert model.name == meta["method"] == method
    assert model.options_dict().get("attention_qkv", False) == ("in_proj_bias" in tuned[0] if tuned else False)
    assert model.max_text_tokens == 77
    tokens = model.tokenizer()(TEXTS)
    with torch.no_grad():
        assert torch.allclose(F.normalize(model.encode_text(tokens), dim=-1), ref.se_text(sd, tokens), atol=1e-5)
        assert torch.allclose(model.encode_video(video), ref.se_video(sd, video), atol=1e-5)
    if tuned:  # a CLIP instance passed as backbone is not modified
        clip = vop.load_clip(folder / "ViT-B-32.pt", heads=(1, 1))
        before = clip.state_dict()[tuned[0]].clone()
        assert vop.load_checkpoint(folder, clip).name == method
        assert torch.equal(clip.state_dict()[tuned[0]], before)


def _bad(tmp_path, change):
    folder = make_folder(tmp_path / "bad")
    change(folder)
    return folder


def _rewrite_config(key, value):
    def change(folder):
        cfg = json.loads((folder / "configuration.json").read_text())
        if value is None:
            del cfg["hyperparam"][key]
        else:
            cfg["hyperparam"][key] = value
        (folder / "configuration.json").write_text(json.dumps(cfg))
    return change


def _rewrite_state(edit):
    def change(folder):
        f = folder / "VoP_msrvtt9k.pth"
        obj = torch.load(f, weights_only=True)
        torch.save(edit(obj), f)
    return change


def _wrong_text_prompts(obj):
    obj["state_dict"]["module.text_prompt_learner.text_prompts"] = torch.zeros(2, 5, 64)
    return obj


def _other_clip_copy(obj):
    obj["state_dict"]["module.image_encoder.ln_pre.weight"] = obj["state_dict"]["module.image_encoder.ln_pre.weight"] + 1
    return obj


class Opaque:  # an arbitrary object: torch.load(weights_only=True) must refuse it
    pass


@pytest.mark.parametrize("change,match", [
    (lambda f: (f / "configuration.json").unlink(), r"bad: is a folder without configuration\.json"),
    (lambda f: (f / "VoP_msrvtt9k.pth").unlink(), r"bad: no weights file; expected one VoP_\*\.pth"),
    (lambda f: (f / "VoP_msrvtt9k.pth").rename(f / "VoPSE_msrvtt9k.pth"),
     r"configuration\.json: model type 'vop-retrieval-model'"),
    (lambda f: (f / "ViT-B-32.pt").unlink(), r"ViT-B-32\.pt: missing: the folder's CLIP backbone"),
    (_rewrite_config("vp_token_num", None), r"configuration\.json: hyperparam lacks vp_token_num"),
    (_rewrite_config("tp_suffix_token_num", "4"), r"hyperparam tp_suffix_token_num must be an integer in 0\.\.4096, got '4'"),
    (_rewrite_config("pooling_type", "transformer"), r"pooling_type 'transformer' is not supported"),
    (_rewrite_config("input_res", 224), r"input_res 224, but the backbone takes 32 px frames"),
    (_rewrite_state(_wrong_text_prompts),
     r"VoP_msrvtt9k\.pth: text_prompt_learner\.text_prompts has shape \(2, 5, 64\), expected \(2, 4, 64\)"),
    (_rewrite_state(lambda o: {"state_dict": {}, "epoch": 1}), r"VoP_msrvtt9k\.pth: holds no tensors"),
    (_rewrite_state(lambda o: {"state_dict": {"module.text_prompt_learner.text_prompts": torch.zeros(2, 4, 64)}}),
     r"VoP_msrvtt9k\.pth: lacks visual_prompt_learner\.visual_prompts"),
    (_rewrite_state(lambda o: {"state_dict": {**o["state_dict"], "module.head.weight": torch.zeros(1)}}),
     r"unexpected tensor 'head\.weight'"),
    (_rewrite_state(_other_clip_copy),
     r"its image_encoder\.ln_pre\.weight differs from the backbone's visual\.ln_pre\.weight"),
    (_rewrite_state(lambda o: {**o, "cfg": Opaque()}),
     r"VoP_msrvtt9k\.pth: cannot be read with torch\.load\(weights_only=True\)"),
])
def test_bad_folders_say_which_file_and_what(tmp_path, change, match):
    folder = _bad(tmp_path, change)
    with pytest.raises(CheckpointError, match=match):
        vop.load_checkpoint(folder)


def test_other_clip_copy_loads_with_check_off_and_se_needs_whole_clip(tmp_path):
    folder = _bad(tmp_path, _rewrite_state(_other_clip_copy))
    assert vop.load_checkpoint(folder, check_fingerprint=False).name == "vop"
    se = make_folder(tmp_path / "se", "se", {"clip.visual.proj": _backbone_sd()["visual.proj"]},
                     {"num_frames": 4, "input_res": 32, "pooling_type": "avg"})
    with pytest.raises(CheckpointError, match=r"VoPSE_msrvtt9k\.pth: lacks \d+ CLIP tensors"):
        vop.load_checkpoint(se)
    with pytest.raises(CheckpointError, match="not one of the authors' ModelScope model folders"):
        vop.read_checkpoint_meta(tmp_path / "se" / "..")


def test_cli_eval_index_and_search_take_the_folder(vop_folder, tmp_path_factory):
    from vop.cli.main import main
    from vop.data import generate_world
    from vop.retrieval import VideoIndex
    from vop.retrieval.search import BackbonePool

    world = tmp_path_factory.mktemp("world")
    generate_world(world, size="smoke")
    out = tmp_path_factory.mktemp("cli")
    assert main(["eval", "--checkpoint", str(vop_folder), "--dataset", "collection", "--root", str(world),
                 "--num-workers", "0", "--device", "cpu", "--json", str(out / "m.json"), "-q"]) == 0
    m = json.loads((out / "m.json").read_text())
    assert m["method"] == "vop" and m["texts"] == 16 and 0 <= m["t2v"]["R1"] <= 100

    assert main(["index", "--videos", str(world / "videos" / "test"), "--checkpoint", str(vop_folder),
                 "--out", str(out / "ix"), "--workers", "0", "--device", "cpu", "-q"]) == 0
    ix = VideoIndex.open(out / "ix")
    info = ix.model_info
    assert info["method"] == "vop" and info["checkpoint_meta"]["format"] == "modelscope-vop" and len(ix) == 16
    assert main(["search", str(out / "ix"), "a red circle", "-k", "3", "--json"]) == 0
    # the served path shares the backbone and loads only the prompts: same text embeddings
    shared, is_shared = BackbonePool().model_for(info)
    own = vop.load_checkpoint(vop_folder).eval()
    tokens = own.tokenizer()(TEXTS)
    with torch.no_grad():
        assert is_shared and torch.allclose(shared.encode_text(tokens), own.encode_text(tokens), atol=1e-6)


def test_semantics_option_is_checked_and_default_is_ours():
    from vop.errors import ConfigError

    assert vop.create_model("vop", "tiny").options_dict()["semantics"] == "vop"
    with pytest.raises(ConfigError, match="semantics must be one of vop, modelscope"):
        vop.create_model("vop", "tiny", semantics="authors")
    with pytest.raises(ConfigError, match="n_text_suffix needs semantics='modelscope'"):
        vop.create_model("vop", "tiny", n_text_suffix=2)
    with pytest.raises(ConfigError, match="leave depth unset"):
        vop.create_model("vop", "tiny", semantics="modelscope", depth=1)
    with pytest.raises(ConfigError, match="n_text_suffix=9 exceeds n_text=8"):
        vop.create_model("vop", "tiny", semantics="modelscope", n_text_suffix=9)
    m = vop.create_model("vop", "tiny", semantics="modelscope", n_text_suffix=3)
    assert m.max_text_tokens == 69 and m.tokenizer().context_length == 69
    assert (m.text_prompts.n_prefix, m.text_prompts.n_suffix) == (5, 3)
