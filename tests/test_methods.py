"""Every method: exact parameter counts, equivalences that catch wrong wiring, gradients, checkpoints.

Registry-driven: the tests over every method iterate ``list_methods()`` and read what each method declares
at registration (``@register(..., expected=Expected(...))``: its ViT-B/32 counts, whether it starts as CLIP,
sees the frames' order, pools meanP, its option sets), so adding a method adds no edit here. The counts each
method declares are the paper's (VoP's table), or, for the methods after VoP, those the spec
(../shared/spec/later-methods.md) computes from the released code; the tests below re-derive several by hand.
"""
import pytest
import torch

import vop
from vop.backbone import build_clip
from vop.errors import CheckpointError, ConfigError
from vop.methods import count_parameters, create_model, get_method, list_methods, plugin_of

#: vop's own methods (a plugin installed in the environment is not vop's to test)
METHODS = [m for m in list_methods() if plugin_of(m) is None]


def expected(method):
    e = get_method(method).expected
    assert e is not None, f"{method} declares no Expected facts: @register(..., expected=Expected(b32=...))"
    return e


def _option_cases():
    """(method, options, trainable on ViT-B/32) for every option set a method declares."""
    return [(m, opts, n) for m in METHODS if get_method(m).expected for opts, n in get_method(m).expected.option_sets]


def _case_id(m, opts, *_):
    return m + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("method", METHODS)
def test_vit_b32_counts(method):
    c = count_parameters(method, "ViT-B/32", frames=12)
    counted, uncounted = expected(method).b32, expected(method).b32_uncounted
    assert c["counted"] == counted
    assert c["uncounted"] == uncounted
    assert c["trainable"] == counted + uncounted
    assert c["backbone"] == 151_277_313


@pytest.mark.parametrize("method, options, trainable", _option_cases(), ids=[_case_id(*c) for c in _option_cases()])
def test_vit_b32_counts_of_the_declared_option_sets(method, options, trainable):
    assert count_parameters(method, "ViT-B/32", frames=12, **options)["trainable"] == trainable


def test_the_declared_counts():
    """The registry's declarations, against the paper and the spec (a wrong declaration fails here)."""
    b32 = {m: (get_method(m).expected.b32, get_method(m).expected.b32_uncounted) for m in METHODS}
    assert {m: b32[m] for m in ("vop", "vop-p", "vop-c", "vop-f", "vop-fp", "vop-fc")} == {
        "vop": (122_880, 0), "vop-p": (528_384, 0), "vop-c": (14_257_152, 0),  # 12*8*512 + 12*8*768 = 122,880
        "vop-f": (122_880, 9_216), "vop-fp": (393_216, 9_216), "vop-fc": (14_269_440, 9_216)}  # + 12 x 768 positions
    assert b32["partial"] == (7_745_792, 0)  # last image block + both heads: the paper's 7.7M
    assert b32["bias"] == (124_928, 0)  # BitFit as the paper counts it (Linear + LayerNorm biases): 0.1M
    assert b32["proj"] == (512 * 512 + 768 * 512, 0) == (655_360, 0)
    assert b32["zeroshot"] == (0, 0) and b32["full"] == (151_277_313, 0)
    assert b32["adapter-attn"] == b32["adapter-ffn"] == (1_982_976, 0)
    # the methods after VoP (../shared/spec/later-methods.md): counts the spec computes from the released code
    assert b32["dgl"] == (9_575_168, 0) and b32["dgl-l"] == (827_392, 0)  # dgl-l: 393,728 inert (W_post)
    assert b32["mv-adapter"] == (3_325_696, 0) and b32["cma"] == (519_168, 0)  # cma: 24 shared up-projections once
    # + 171,008 CLIP biases (q/k/v included) with train_clip_bias, as shipped
    assert get_method("mv-adapter").expected.option_sets == (({"train_clip_bias": True}, 3_325_696 + 171_008),)
    # LoRA and TempMe (../shared/spec/lora-tempme.md): fused q/k/v, one A shared by q, k, v, r = 8, both towers;
    # TempMe adds its clip position embeddings (12 + 6 + 3) x 768
    assert b32["lora"] == (12 * 4 * 8 * 768 + 12 * 4 * 8 * 512, 0) == (491_520, 0)
    assert b32["tempme"] == (491_520 + 21 * 768, 0) == (507_648, 0)


def test_bias_selects_exactly_the_documented_biases():
    """Default: the bias of every Linear/LayerNorm (attention out-proj, MLP, LayerNorms), 124,928 on
    ViT-B/32 = the paper's 0.1M; the fused q/k/v in_proj_bias (12 x 2 blocks: 24 tensors, 46,080
    values) only with attention_qkv=True (171,008, every bias of CLIP)."""
    with torch.device("meta"):
        clip = vop.build_clip("ViT-B-32")
        model = create_model("bias", clip)
    names = {n.removeprefix("clip.") for n, _ in model.named_trainable_parameters()}
    per_block = {"attn.out_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias", "ln_1.bias", "ln_2.bias"}
    want = {f"{tower}resblocks.{i}.{leaf}" for tower in ("transformer.", "visual.transformer.")
            for i in range(12) for leaf in per_block}
    want |= {"visual.ln_pre.bias", "visual.ln_post.bias", "ln_final.bias"}
    assert names == want
    # hand count: text 12 x (512 + 2048 + 512 + 2 x 512) + image 12 x (768 + 3072 + 768 + 2 x 768)
    #             + ln_pre, ln_post (768 each) + ln_final (512)
    assert 12 * (512 + 2048 + 512 + 1024) + 12 * (768 + 3072 + 768 + 1536) + 768 * 2 + 512 == 124_928
    assert count_parameters("bias")["trainable"] == 124_928
    full = count_parameters("bias", attention_qkv=True)["trainable"]
    assert full == 124_928 + 12 * 3 * 512 + 12 * 3 * 768 == 171_008
    with pytest.raises(ConfigError, match="true or false"):
        create_model("bias", "tiny", attention_qkv="yes")


def test_registry_complete_and_ablation_counts():
    assert all(expected(m) for m in METHODS)  # every method of vop declares what its tests check
    assert count_parameters("vop", n_video=0)["trainable"] == 12 * 8 * 512  # text-only
    assert count_parameters("vop", n_text=0)["trainable"] == 12 * 8 * 768  # video-only
    assert count_parameters("vop", depth=6)["trainable"] == 6 * 8 * (512 + 768)
    assert count_parameters("vop", n_text=16, n_video=4)["trainable"] == 12 * (16 * 512 + 4 * 768)
    assert count_parameters("vop-p", frames=8)["trainable"] == 12 * 8 * 512 + 12 * (4 + 4 * 8) * 768
    assert count_parameters("vop-f", ks=12)["trainable"] == 122_880  # no frame position embedding
    assert count_parameters("vop-f", ks=4)["counted"] == 122_880
    # context module: BiLSTM 9,449,472 + linear 4,721,664 on d_v = 768
    assert count_parameters("vop-c")["trainable"] - count_parameters("vop", n_video=4)["trainable"] == 9_449_472 + 4_721_664


def test_unknown_method_and_option():
    with pytest.raises(ConfigError, match="did you mean 'vop-f'"):
        create_model("vop_f", "tiny")
    with pytest.raises(ConfigError, match="has no option 'kss'.*did you mean 'ks'"):
        create_model("vop-f", "tiny", kss=3)
    with pytest.raises(ConfigError, match="must be an integer"):
        create_model("vop", "tiny", n_text="8")


@pytest.mark.parametrize("method", METHODS)
def test_frozen_methods_start_as_clip_or_differ(method, tiny_clip, video_batch, token_batch):
    """Baselines start exactly at CLIP; prompted methods change both embeddings."""
    model = create_model(method, tiny_clip, frames=4).eval()
    with torch.no_grad():
        frames = tiny_clip.encode_image(video_batch.flatten(0, 1)).view(3, 4, -1)
        # a pairwise method (cma) keeps the raw frame embeddings; a dual encoder pools them (meanP)
        ref_v = frames if model.pairwise else torch.nn.functional.normalize(frames, dim=-1).mean(1)
        ref_t = tiny_clip.encode_text(token_batch)
        v, t = model.encode_video(video_batch), model.encode_text(token_batch)
    e = expected(method)
    text_at_init = e.clip_at_init if e.text_clip_at_init is None else e.text_clip_at_init
    if not e.clip_at_init:  # prompts, or adapters that are not zero at initialisation
        assert not torch.allclose(v, ref_v, atol=1e-3)
    else:
        assert torch.allclose(v, ref_v, atol=1e-5)
    if not text_at_init:
        assert not torch.allclose(t, ref_t, atol=1e-3)
    else:
        assert torch.allclose(t, ref_t, atol=1e-5)


def test_zero_prompt_tokens_is_clip(tiny_clip, video_batch, token_batch):
    model = create_model("vop", tiny_clip, frames=4, n_text=0, n_video=0)
    zs = create_model("zeroshot", tiny_clip, frames=4)
    assert model.parameter_counts()["trainable"] == 0
    with torch.no_grad():
        assert torch.allclose(model.encode_video(video_batch), zs.encode_video(video_batch), atol=1e-6)
        assert torch.allclose(model.encode_text(token_batch), zs.encode_text(token_batch), atol=1e-6)


def test_zero_valued_prompts_are_not_clip(tiny_clip, video_batch):
    """Prompt *tokens* take part in attention even when zero: only n = 0 gives CLIP back."""
    model = create_model("vop", tiny_clip, frames=4, n_text=0)
    with torch.no_grad():
        model.video_prompts.source.shared.zero_()
        zs = create_model("zeroshot", tiny_clip, frames=4)
        assert not torch.allclose(model.encode_video(video_batch), zs.encode_video(video_batch), atol=1e-4)


def _copy_prompts(src, dst):
    with torch.no_grad():
        dst.text_prompts.tokens.copy_(src.text_prompts.tokens)
        dst.video_prompts.shallow.shared.copy_(src.video_prompts.source.shared)


def test_vop_f_with_ks_equal_layers_is_vop(tiny_clip, video_batch, token_batch):
    a = create_model("vop", tiny_clip, frames=4)
    b = create_model("vop-f", tiny_clip, frames=4, ks=tiny_clip.cfg.vision.layers)
    _copy_prompts(a, b)
    with torch.no_grad():
        assert torch.allclose(a.encode_video(video_batch), b.encode_video(video_batch), atol=1e-6)
        assert torch.allclose(a.encode_text(token_batch), b.encode_text(token_batch), atol=1e-6)


def test_vop_f_joint_layers_match_manual(tiny_clip, video_batch):
    """The joint layers really see one sequence per video: compare with a hand-written forward."""
    m = create_model("vop-f", tiny_clip, frames=4, ks=1).eval()
    blocks = tiny_clip.visual.transformer.resblocks
    B, F = video_batch.shape[:2]
    with torch.no_grad():
        x = tiny_clip.visual.embed(video_batch.flatten(0, 1))  # (12, 17, 64)
        p = m.video_prompts.shallow.shared[0].expand(B * F, -1, -1)
        x = blocks[0](torch.cat([x[:, :1], p, x[:, 1:]], 1))
        x = torch.cat([x[:, :1], x[:, 9:]], 1).view(B, F, 17, 64) + m.video_prompts.frame_position.view(1, F, 1, 64)
        seq = torch.cat([x[:, :, 0], m.video_prompts.deep[0].expand(B, -1, -1), x[:, :, 1:].reshape(B, F * 16, 64)], 1)
        assert seq.shape == (3, 4 + 8 + 64, 64)
        seq = blocks[1](seq)
        want = torch.nn.functional.normalize(tiny_clip.visual.head(seq[:, :F]), dim=-1).mean(1)
        assert torch.allclose(m.encode_video(video_batch), want, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(method, tiny_clip, video_batch, token_batch):
    model = create_model(method, tiny_clip, frames=4).eval()
    with torch.no_grad():
        v_all, t_all = model.encode_video(video_batch), model.encode_text(token_batch)
        for i in range(3):
            assert torch.allclose(model.encode_video(video_batch[i : i + 1]), v_all[i : i + 1], atol=1e-5)
            assert torch.allclose(model.encode_text(token_batch[i : i + 1]), t_all[i : i + 1], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_frame_order(method, tiny_clip, video_batch, token_batch):
    model = create_model(method, tiny_clip, frames=4).eval()
    with torch.no_grad():
        v = model.encode_video(video_batch)
        rev = model.encode_video(video_batch.flip(1))
        if model.pairwise:  # the per-frame embeddings are pooled per text: compare the scores
            t = model.encode_text(token_batch)
            v, rev = model.similarity(t, v), model.similarity(t, rev)
    if not expected(method).frame_order:
        assert torch.allclose(v, rev, atol=1e-5)  # frames encoded independently (or without positions), then pooled
    else:  # order-aware: far above float rounding (~1e-7) on these unit-scale meanP embeddings
        assert (v - rev).abs().max() > 1e-4


GRADIENT_CASES = [(m, {}) for m in METHODS] + [(m, o) for m, o, _ in _option_cases()]


@pytest.mark.parametrize("method, options", GRADIENT_CASES, ids=[_case_id(*c) for c in GRADIENT_CASES])
def test_gradients_reach_exactly_the_trainable_tensors(method, options, tiny_clip, video_batch, token_batch):
    clip = build_clip("tiny", seed=0)
    model = create_model(method, clip, frames=4, **options).train()
    with torch.no_grad():  # move zero-initialised pieces (adapter up-projections) off their init
        for name, p in model.named_trainable_parameters():
            if not name.startswith("clip."):
                p.add_(0.02 * torch.randn_like(p))
    v, t = model(video_batch, token_batch)
    logits = model.logit_scale * (model.similarity(t, v) if model.pairwise else t @ v.t())
    labels = torch.arange(3)
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    if not model.trainable_parameters():  # zero-shot
        assert not loss.requires_grad and expected(method).b32 == 0
        return
    loss.backward()
    trainable = dict(model.named_trainable_parameters())
    for name, p in model.named_parameters():
        if name in trainable and model.inert and name.endswith(model.inert):  # never reaches the output (dgl-l's W_post)
            assert p.grad is None or not p.grad.any(), f"{method}: inert {name} got a gradient"
        elif name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{method}: no gradient for {name}"
        else:
            assert p.grad is None, f"{method}: frozen {name} got a gradient"


def test_grad_checkpointing_same_gradients(tiny_clip, video_batch, token_batch):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = create_model("vop-fc", tiny_clip, frames=4).train().set_grad_checkpointing(ckpt)
        v, t = m(video_batch, token_batch)
        (t @ v.t()).trace().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_trainable_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_text_budget_shrinks(tiny_clip):
    m = create_model("vop", tiny_clip, frames=4, n_text=8)
    assert m.max_text_tokens == 77 - 8
    tok = m.tokenizer()
    ids = tok(["word " * 200])
    assert ids.shape == (1, 69) and ids[0, -1] == 49407
    with torch.no_grad():
        assert m.encode_text(ids).shape == (1, 64)
    with pytest.raises(ValueError, match="at most 69"):
        m.encode_text(torch.zeros(1, 77, dtype=torch.long))
    assert m.tokenizer(max_words=32)(["hi"]).shape == (1, 32)


def test_wrong_frame_count_is_clear(tiny_clip):
    m = create_model("vop-p", tiny_clip, frames=4)
    with pytest.raises(ValueError, match="built for 4 frames, got 3"):
        m.encode_video(torch.randn(1, 3, 3, 32, 32))


# -- prompt checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path, tiny_clip, video_batch):
    m = create_model("vop-fc", tiny_clip, frames=4, ks=1)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p))
    path = vop.save_checkpoint(m, tmp_path / "p.safetensors")
    meta = vop.read_checkpoint_meta(path)
    assert meta["method"] == "vop-fc" and meta["options"]["ks"] == 1 and meta["frames"] == 4
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(dict(m.named_trainable_parameters()))  # only trainable tensors
    m2 = vop.load_checkpoint(path, tiny_clip)
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), m2.encode_video(video_batch))


def test_checkpoint_mismatches(tmp_path, tiny_clip):
    m = create_model("vop", tiny_clip, frames=4)
    path = vop.save_checkpoint(m, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="tiny-4l|another architecture|different"):
        vop.load_checkpoint(path, build_clip("tiny-4l"))
    with pytest.raises(CheckpointError, match="fingerprint"):
        vop.load_checkpoint(path, build_clip("tiny", seed=1))
    assert vop.load_checkpoint(path, build_clip("tiny", seed=1), check_fingerprint=False).name == "vop"
    from vop.methods.checkpoint import load_trainable

    with pytest.raises(CheckpointError, match="is a 'vop' checkpoint, the model is 'vop-f'"):
        load_trainable(create_model("vop-f", tiny_clip, frames=4), path)
    with pytest.raises(CheckpointError, match="options"):
        load_trainable(create_model("vop", tiny_clip, frames=4, n_text=4), path)
    with pytest.raises(CheckpointError, match="holds only prompts"):
        vop.load_checkpoint(path)
    vop.save_clip(tiny_clip, tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="not a prompt checkpoint"):
        vop.read_checkpoint_meta(tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        vop.load_checkpoint(tmp_path / "nope.safetensors", tiny_clip)


def test_full_checkpoint_is_whole_model(tmp_path, tiny_clip, video_batch):
    m = create_model("full", build_clip("tiny", seed=0), frames=4)
    with torch.no_grad():
        m.clip.visual.proj.mul_(2)
    path = vop.save_checkpoint(m, tmp_path / "full.safetensors")
    m2 = vop.load_checkpoint(path)  # no backbone needed
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), m2.encode_video(video_batch))


@pytest.mark.slow
def test_vit_b32_shapes_and_joint_sequence():
    """Real ViT-B/32 shapes: 12 frames x 49 patches; VoP^F's deep layers see 608 tokens."""
    torch.manual_seed(0)
    m = create_model("vop-f", "ViT-B/32", frames=12).eval()
    seen = []
    blk = m.clip.visual.transformer.resblocks[8]
    h = blk.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        v = m.encode_video(torch.randn(1, 12, 3, 224, 224))
        t = m.encode_text(m.tokenizer(max_words=32)(["a dog jumps into a pool"]))
    h.remove()
    assert v.shape == (1, 512) and t.shape == (1, 512)
    assert seen == [(1, 12 * (1 + 49) + 8, 768)]


def test_vop_f_frame_position_std_option(tiny_clip, tmp_path):
    default = create_model("vop-f", tiny_clip, frames=8, ks=1).video_prompts.frame_position
    wide = create_model("vop-f", tiny_clip, frames=8, ks=1, frame_position_std=1.0)
    assert 0.01 < default.std().item() < 0.04 and 0.8 < wide.video_prompts.frame_position.std().item() < 1.2
    back = vop.load_checkpoint(vop.save_checkpoint(wide, tmp_path / "f.safetensors"), tiny_clip)
    assert back.opts.frame_position_std == 1.0
    assert torch.equal(back.video_prompts.frame_position, wide.video_prompts.frame_position)


def test_checkpoint_without_a_newer_option_loads_with_its_default(tmp_path, tiny_clip):
    """A file written before an option existed (here VoP^F's frame_position_std) still loads."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = create_model("vop-f", tiny_clip, frames=4, ks=1)
    path = vop.save_checkpoint(m, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["vop"])
    del meta["options"]["frame_position_std"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"vop": json.dumps(meta)})
    back = vop.load_checkpoint(old, tiny_clip)
    assert back.opts.frame_position_std == 0.02
    assert torch.equal(back.video_prompts.frame_position, m.video_prompts.frame_position)


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).expected and get_method(m).expected.mean_pooled])
def test_encode_video_is_meanP(method, tiny_clip, video_batch):
    """Every method pools the field's way (CLIP4Clip meanP): normalise each frame, then average.
    Checked against an independent numpy computation from the per-frame embeddings."""
    import numpy as np

    model = create_model(method, tiny_clip, frames=4).eval()
    with torch.no_grad():
        frames = model.encode_frames(video_batch).double().numpy()  # (B, F, D)
        got = model.encode_video(video_batch).double().numpy()
    want = np.stack([np.mean([f / np.sqrt((f * f).sum()) for f in video], axis=0) for video in frames])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # and it is not the mean of the unnormalised frames (the old convention)
    assert not np.allclose(got, frames.mean(1), atol=1e-3)


def test_prompts_in_the_last_layers(tiny_clip, video_batch, token_batch):
    """prompt_from="output": the last `depth` layers get prompts (the ablation of where prompts help);
    with every layer prompted it is the same model as from the input."""
    L = tiny_clip.cfg.vision.layers
    m = create_model("vop", tiny_clip, frames=4, depth=1, prompt_from="output")
    assert m.text_prompts.start == tiny_clip.cfg.text.layers - 1 and m.video_prompts.source.start == L - 1
    x = torch.zeros(2, 3, tiny_clip.cfg.vision.width)
    assert [m.video_prompts.source.tokens(i, x, 1, 2) is not None for i in range(L)] == [i == L - 1 for i in range(L)]
    assert m.parameter_counts()["trainable"] == create_model("vop", tiny_clip, frames=4, depth=1).parameter_counts()["trainable"]
    torch.manual_seed(0)
    a = create_model("vop", tiny_clip, frames=4, prompt_from="output").eval()
    torch.manual_seed(0)
    b = create_model("vop", tiny_clip, frames=4).eval()
    with torch.no_grad():
        assert torch.equal(a.encode_video(video_batch), b.encode_video(video_batch))
        assert torch.equal(a.encode_text(token_batch), b.encode_text(token_batch))
        # the first layer's prompts and the last layer's are different models
        c = create_model("vop", tiny_clip, frames=4, depth=1, prompt_from="output").eval()
        d = create_model("vop", tiny_clip, frames=4, depth=1).eval()
        d.load_state_dict(c.state_dict())
        assert not torch.allclose(c.encode_video(video_batch), d.encode_video(video_batch), atol=1e-4)
    with pytest.raises(ConfigError, match="prompt_from"):
        create_model("vop", tiny_clip, prompt_from="middle")
