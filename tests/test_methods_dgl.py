"""DGL (``dgl``, ``dgl-l``): the build specification's tests (shared/spec/later-methods.md, section 1 (g)) plus
checkpoints, one training step and the ``vop params`` listing. Forward passes run on the tiny backbones."""
import json

import pytest
import torch
import torch.nn.functional as F

import vop
from vop.backbone import build_clip
from vop.backbone.layers import ResidualAttentionBlock
from vop.errors import ConfigError
from vop.methods import count_parameters, create_model
from vop.methods.dgl import global_local_attention, global_local_block, video_attention_mask

DGL = ["dgl", "dgl-l"]


def _perturb(model, scale=0.05, seed=1):
    """Move every trainable tensor off its initialisation (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_trainable_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# -- (g) 1: counts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B/32", "ViT-B-16", "ViT-B/16"])
def test_counts(arch):
    c = count_parameters("dgl", arch, frames=12)
    assert (c["trainable"], c["counted"], c["uncounted"], c["inert"]) == (9_575_168, 9_575_168, 0, 0)
    # G 7,087,872 + MLP_t 1,968,128 + E 12*56*768 + P_G 4*768
    assert 768 * 2304 + 2304 + 768 * 768 + 768 + 4 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 == 7_087_872
    assert 7_087_872 + (768 * 1536 + 1536 + 1536 * 512 + 512) + 12 * 56 * 768 + 4 * 768 == 9_575_168
    c = count_parameters("dgl-l", arch, frames=12)
    assert (c["trainable"], c["counted"], c["uncounted"], c["inert"]) == (827_392, 827_392, 0, 393_728)
    assert 12 * 4 * 768 + 2 * (768 * 512 + 512) + 4 * 768 == 827_392
    # without the postfix slot: W_post is gone, the effective size remains
    assert count_parameters("dgl-l", arch, frames=12, postfix=False)["trainable"] == 827_392 - 393_728 == 433_664
    assert count_parameters("dgl", arch, frames=12, postfix=False)["trainable"] == 9_575_168  # E keeps its postfix rows


def test_counts_follow_the_options():
    # dgl: E grows with the frames (4 local prompts per frame position); dgl-l does not depend on F
    assert count_parameters("dgl", frames=8)["trainable"] == 9_575_168 - 12 * 4 * 4 * 768
    assert count_parameters("dgl-l", frames=8)["trainable"] == 827_392
    assert count_parameters("dgl-l", n_local=2, n_text=4)["trainable"] == 12 * 2 * 768 + 2 * (768 * 512 + 512) + 4 * 768
    assert count_parameters("dgl", n_global=0, readout="cls_mean")["trainable"] == 9_575_168 - 4 * 768
    assert count_parameters("dgl", depth=6)["trainable"] == 9_575_168 - 6 * 56 * 768
    # depth None = every layer; larger values are clamped to the towers
    assert count_parameters("dgl", depth=12)["trainable"] == count_parameters("dgl", depth=40)["trainable"] == 9_575_168


def test_options_are_checked(tiny_clip):
    with pytest.raises(ConfigError, match="readout"):
        create_model("dgl", tiny_clip, frames=4, readout="cls")
    with pytest.raises(ConfigError, match="n_global >= 1"):
        create_model("dgl", tiny_clip, frames=4, n_global=0)
    with pytest.raises(ConfigError, match="n_text must be 2 \\* n_local = 4"):
        create_model("dgl-l", tiny_clip, frames=4, n_local=2)
    with pytest.raises(ConfigError, match="true or false"):
        create_model("dgl", tiny_clip, frames=4, postfix="no")
    with pytest.raises(ConfigError, match="has no option"):
        create_model("dgl", tiny_clip, frames=4, n_prompts=3)


def test_initialisation_and_weight_decay(tiny_clip):
    torch.manual_seed(0)
    m = create_model("dgl", tiny_clip, frames=4)
    a = (6 / (3 * 8 * 8 + 64)) ** 0.5  # tiny: patch 8, d_v 64
    assert m.global_prompts.tokens.abs().max() <= a and m.global_prompts.tokens.abs().max() > 0.8 * a
    e = m.generator.embedding
    assert e.shape == (2, 8 + 4 * 4, 64) and 0.9 < e.std().item() < 1.1  # N(0, 1), as nn.Embedding
    assert torch.all(m.generator.block.attn.in_proj_bias == 0) and torch.all(m.generator.block.attn.out_proj.bias == 0)
    assert m.generator.text_mlp.c_fc.weight.shape == (128, 64) and m.generator.text_mlp.c_proj.weight.shape == (64, 128)
    # vop's rule: no weight decay on prompt tokens (nor biases / LayerNorms); the generator's matrices decay
    no_decay = m.no_weight_decay()
    assert {"generator.embedding", "global_prompts.tokens"} <= no_decay
    assert "generator.block.attn.in_proj_weight" not in no_decay and "generator.text_mlp.c_fc.weight" not in no_decay
    lin = create_model("dgl-l", tiny_clip, frames=4)
    assert lin.generator.visual.abs().max() <= a
    assert {"generator.visual", "global_prompts.tokens", "generator.prefix.bias"} <= lin.no_weight_decay()
    assert "generator.prefix.weight" not in lin.no_weight_decay()


# -- (g) 2: reduction to CLIP ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", [("dgl", {}), ("dgl-l", {"n_text": 0})])
def test_no_global_no_local_is_clip(method, opts, tiny_clip, video_batch):
    """0 global and 0 local prompts, readout cls_mean: the frame embeddings are plain frozen CLIP's, exactly."""
    m = create_model(method, tiny_clip, frames=4, n_global=0, n_local=0, readout="cls_mean", **opts).eval()
    zs = create_model("zeroshot", tiny_clip, frames=4).eval()
    with torch.no_grad():
        ref = tiny_clip.encode_image(video_batch.flatten(0, 1)).view(3, 4, -1)
        assert torch.equal(m.encode_frames(video_batch), ref)
        assert torch.equal(m.encode_video(video_batch), zs.encode_video(video_batch))


def test_prompts_change_both_embeddings(tiny_clip, video_batch, token_batch):
    zs = create_model("zeroshot", tiny_clip, frames=4)
    for method in DGL:
        m = create_model(method, tiny_clip, frames=4, readout="cls_mean").eval()
        with torch.no_grad():
            assert not torch.allclose(m.encode_video(video_batch), zs.encode_video(video_batch), atol=1e-3)
            assert not torch.allclose(m.encode_text(token_batch), zs.encode_text(token_batch), atol=1e-3)


# -- (g) 3: two SDPA calls == one masked attention ---------------------------------------------------------
def _masked_block(blk, g, x, frames):
    """Reference: one attention over the whole video sequence [global; frame 1; ...; frame F] with the block mask."""
    B, G, d = g.shape
    T = x.shape[1]
    s = torch.cat([g, x.reshape(B, frames * T, d)], dim=1)
    q, k, v = blk.attn.qkv(blk.ln_1(s))
    mask = video_attention_mask(G, frames, T)
    a = blk.attn.project_out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    s = s + a
    s = s + blk.mlp(blk.ln_2(s))
    return a, s


def test_global_local_attention_is_one_masked_attention_float64():
    """ViT-B/32 shapes: 4 global + 12 frames x (CLS + 4 local + 49 patches) = 652 tokens, width 768, 12 heads."""
    torch.manual_seed(0)
    blk = ResidualAttentionBlock(768, 12, 4.0, "quick_gelu").double()
    torch.nn.init.normal_(blk.attn.in_proj_weight, std=768**-0.5)
    B, G, Fr, T = 2, 4, 12, 54
    g, x = torch.randn(B, G, 768, dtype=torch.float64), torch.randn(B * Fr, T, 768, dtype=torch.float64)
    with torch.no_grad():
        a_g, a_x = global_local_attention(blk.attn, blk.ln_1(g), blk.ln_1(x), Fr)
        a_ref, s_ref = _masked_block(blk, g, x, Fr)
        assert a_ref.shape == (B, 652, 768)
        torch.testing.assert_close(a_g, a_ref[:, :G], rtol=0, atol=1e-10)
        torch.testing.assert_close(a_x, a_ref[:, G:].reshape(B * Fr, T, 768), rtol=0, atol=1e-10)
        g2, x2 = global_local_block(blk, g, x, Fr)
        torch.testing.assert_close(g2, s_ref[:, :G], rtol=0, atol=1e-10)
        torch.testing.assert_close(x2, s_ref[:, G:].reshape(B * Fr, T, 768), rtol=0, atol=1e-10)
    # the mask really is asymmetric: frames do not see other frames, the global tokens see all
    mask = video_attention_mask(G, Fr, T)
    assert mask[:G].all() and mask[:, :G].all() and not mask[G, G + T] and mask[G + T, G + T + T - 1]


def test_model_video_pass_matches_masked_reference_float64(video_batch):
    """The whole image tower of ``dgl`` (prompt slots, global tokens carried, read-outs) against a hand-written
    loop over one masked attention per block on the video sequence."""
    clip = build_clip("tiny", seed=0).double().eval()
    torch.manual_seed(0)
    m = _perturb(create_model("dgl", clip, frames=4, n_local=2, n_global=3)).double().eval()
    video = video_batch.double()
    B, Fr = video.shape[:2]
    with torch.no_grad():
        p = m.export_prompts()
        x = clip.visual.embed(video.flatten(0, 1))  # (12, 17, 64)
        g = p["global"].expand(B, -1, -1)
        for i, blk in enumerate(clip.blocks("visual")):
            local = p["local"][i].expand(B, Fr, -1, -1).flatten(0, 1)
            x = torch.cat([x[:, :1], local, x[:, 1 + (2 if i else 0):]], dim=1)
            _, s = _masked_block(blk, g, x, Fr)
            g, x = s[:, :3], s[:, 3:].reshape(B * Fr, -1, 64)
        assert x.shape == (12, 1 + 2 + 16, 64)
        want = clip.visual.head(g[:, 0])
        torch.testing.assert_close(m.encode_video(video), want, rtol=0, atol=1e-10)
        m.opts.readout = "global_cls_mean"
        cls = clip.visual.head(x[:, 0]).view(B, Fr, -1)
        torch.testing.assert_close(m.encode_video(video), torch.cat([clip.visual.head(g), cls], 1).mean(1), rtol=0, atol=1e-10)
        torch.testing.assert_close(m.encode_frames(video), cls, rtol=0, atol=1e-10)


def test_model_text_pass_matches_manual_float64(token_batch):
    """[SOT, 4 prefix, w_1 .. w_{T-1}, 4 postfix], prompts overwritten before every layer, read at [EOT] + 4."""
    clip = build_clip("tiny", seed=0).double().eval()
    torch.manual_seed(0)
    m = _perturb(create_model("dgl", clip, frames=4, n_local=2)).double().eval()
    with torch.no_grad():
        text = m.export_prompts()["text"]  # (2 layers, 8, 64)
        assert text.shape == (2, 8, 64)
        x = clip.embed_text(token_batch)
        B, T = token_batch.shape
        for i, blk in enumerate(clip.blocks("text")):
            pre, post = text[i, :4].expand(B, -1, -1), text[i, 4:].expand(B, -1, -1)
            x = torch.cat([x[:, :1], pre, x[:, 1 + (4 if i else 0): (4 if i else 0) + T], post], dim=1)
            assert x.shape[1] == T + 8
            x = blk(x, causal=True)
        x = clip.ln_final(x)
        want = x[torch.arange(B), token_batch.argmax(-1) + 4] @ clip.text_projection
        torch.testing.assert_close(m.encode_text(token_batch), want, rtol=0, atol=1e-10)


# -- (g) 4: frame order ---------------------------------------------------------------------------------
def test_frame_order(tiny_clip, video_batch):
    perm = torch.tensor([2, 0, 3, 1])
    for method in DGL:
        m = _perturb(create_model(method, tiny_clip, frames=4)).eval()
        with torch.no_grad():
            v, shuffled = m.encode_video(video_batch), m.encode_video(video_batch[:, perm])
        if method == "dgl-l":  # prompts shared by all frames, no temporal position: a set of frames
            assert torch.allclose(v, shuffled, atol=1e-5)
        else:  # frame-position-specific local prompts
            assert (v - shuffled).abs().max() > 1e-3


# -- (g) 5: postfix inertness, batch independence, constant-folded export --------------------------------
@pytest.mark.parametrize("method", DGL)
def test_postfix_is_inert(method, tiny_clip, video_batch, token_batch):
    torch.manual_seed(0)
    a = _perturb(create_model(method, tiny_clip, frames=4)).eval()
    b = create_model(method, tiny_clip, frames=4, postfix=False).eval()
    mine = dict(b.named_trainable_parameters())
    with torch.no_grad():
        for n, p in a.named_trainable_parameters():
            if n in mine:
                mine[n].copy_(p)
    assert set(dict(a.named_trainable_parameters())) - set(mine) == (
        {"generator.postfix.weight", "generator.postfix.bias"} if method == "dgl-l" else set())
    assert a.text_prompt_tokens == 8 and b.text_prompt_tokens == 4
    with torch.no_grad():
        assert torch.equal(a.encode_text(token_batch), b.encode_text(token_batch))  # bit-identical
        assert torch.equal(a.encode_video(video_batch), b.encode_video(video_batch))
    # changing the postfix prompts changes nothing either (they sit after every [EOT], causal mask)
    with torch.no_grad():
        before = a.encode_text(token_batch)
        if method == "dgl-l":
            a.generator.postfix.weight.mul_(-3.0)
        else:
            a.generator.text_mlp.c_proj.bias.add_(1.0)  # moves the prefix too: compare with the prefix-only model
            b.generator.text_mlp.c_proj.bias.add_(1.0)
            before = b.encode_text(token_batch)
        assert torch.equal(a.encode_text(token_batch), before)


@pytest.mark.parametrize("method", DGL)
def test_batch_independence_and_constant_export(method, tiny_clip, video_batch, token_batch):
    m = _perturb(create_model(method, tiny_clip, frames=4)).eval()
    p = m.export_prompts()
    # the prompts written into the sequences are the same for every sample, and are the exported constants
    seen = {}
    hooks = [m.clip.blocks("text")[1].register_forward_pre_hook(lambda mod, inp: seen.__setitem__("text", inp[0])),
             m.clip.blocks("visual")[1].ln_1.register_forward_pre_hook(
                 lambda mod, inp: seen.setdefault("visual", []).append(inp[0]))]
    with torch.no_grad():
        v_all, t_all = m.encode_video(video_batch), m.encode_text(token_batch)
    for h in hooks:
        h.remove()
    T = token_batch.shape[1]
    text_slots = torch.cat([seen["text"][:, 1:5], seen["text"][:, 4 + T:]], dim=1)  # prefix, postfix
    assert torch.equal(text_slots, p["text"][1].expand(3, -1, -1))
    g_in, x_in = seen["visual"]  # ln_1 of block 1: global tokens first, then the frames
    assert g_in.shape == (3, 4, 64) and x_in.shape == (12, 1 + 4 + 16, 64)
    local = x_in[:, 1:5].view(3, 4, 4, 64)
    assert torch.equal(local, p["local"][1].expand(3, 4, -1, -1))
    with torch.no_grad():
        for i in range(3):
            assert torch.allclose(m.encode_video(video_batch[i: i + 1]), v_all[i: i + 1], atol=1e-5)
            assert torch.allclose(m.encode_text(token_batch[i: i + 1]), t_all[i: i + 1], atol=1e-5)
        m.fold_prompts()  # the generator replaced by its outputs: the same embeddings, bit for bit
        assert torch.equal(m.encode_video(video_batch), v_all) and torch.equal(m.encode_text(token_batch), t_all)
        for prm in m.generator.parameters():
            prm.zero_()  # folded: the generator is not run any more
        assert torch.equal(m.encode_text(token_batch), t_all)
    m.train()  # training unfolds
    assert m._folded is None


# -- frames -----------------------------------------------------------------------------------------------
def test_frame_count(tiny_clip, video_batch):
    m = create_model("dgl", tiny_clip, frames=4)
    assert m.frame_bound_tensor() == "frame-position-specific local prompts"
    with pytest.raises(ConfigError, match="fixes that count"):
        m.check_frames(3)
    with pytest.raises(ValueError, match="built for 4 frames, got 3"):
        m.encode_video(video_batch[:, :3])
    lin = create_model("dgl-l", tiny_clip, frames=4).eval()
    assert lin.frame_bound_tensor() is None and lin.check_frames(3) == 3
    with torch.no_grad():
        assert lin.encode_video(video_batch[:, :3]).shape == (3, 64)
    assert create_model("dgl", tiny_clip, frames=4, n_local=0).frame_bound_tensor() is None


def test_text_budget_is_the_context(tiny_clip):
    """The words keep CLIP's positions, the prompts take none: a full 77-token caption fits (85 in the tower)."""
    m = create_model("dgl", tiny_clip, frames=4).eval()
    assert m.max_text_tokens == 77
    ids = m.tokenizer()(["word " * 200])
    assert ids.shape == (1, 77)
    with torch.no_grad():
        assert m.encode_text(ids).shape == (1, 64)


# -- checkpoints and training --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", DGL)
def test_checkpoint_round_trip(method, tmp_path, tiny_clip, video_batch, token_batch):
    m = _perturb(create_model(method, tiny_clip, frames=4, n_local=2, n_text=4, readout="global_mean")).eval()
    path = vop.save_checkpoint(m, tmp_path / "dgl.safetensors")
    meta = vop.read_checkpoint_meta(path)
    assert meta["method"] == method and meta["options"]["readout"] == "global_mean" and meta["frames"] == 4
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(dict(m.named_trainable_parameters()))
    back = vop.load_checkpoint(path, tiny_clip).eval()
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), back.encode_video(video_batch))
        assert torch.equal(m.encode_text(token_batch), back.encode_text(token_batch))


@pytest.mark.parametrize("method", DGL)
def test_one_training_step_changes_only_the_trainable_tensors(method, video_batch, token_batch):
    from vop.engine.optim import param_groups

    clip = build_clip("tiny", seed=0)
    m = create_model(method, clip, frames=4).train()
    frozen = {n: p.detach().clone() for n, p in m.clip.named_parameters()}
    before = {n: p.detach().clone() for n, p in m.named_trainable_parameters()}
    assert not any(n.startswith("clip.") for n in before)
    opt = torch.optim.AdamW(param_groups(m, 1e-3, 0.0, 0.2), betas=(0.9, 0.98), eps=1e-6)
    v, t = m(video_batch, token_batch)
    logits = m.logit_scale * t @ v.t()
    labels = torch.arange(3)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    inert = set(m.inert)
    for n, p in m.named_parameters():
        if n in before and n not in inert:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{method}: no gradient for {n}"
        elif n in inert:  # the postfix projection: exactly zero gradient
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n
        else:
            assert p.grad is None, f"{method}: frozen {n} got a gradient"
    opt.step()
    for n, p in m.clip.named_parameters():
        assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    for n, p in m.named_trainable_parameters():
        if n == "generator.postfix.bias":  # no gradient, no decay: untouched
            assert torch.equal(p, before[n])
        else:  # (generator.postfix.weight moves by weight decay only)
            assert not torch.equal(p, before[n]), f"{n} did not change"


def test_grad_checkpointing_same_gradients(tiny_clip, video_batch, token_batch):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = create_model("dgl", tiny_clip, frames=4).train().set_grad_checkpointing(ckpt)
        v, t = m(video_batch, token_batch)
        (t @ v.t()).trace().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_trainable_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


# -- vop params -------------------------------------------------------------------------------------------
def test_vop_params_lists_both(capsys):
    from vop.cli.main import main

    assert main(["params", "--backbone", "ViT-B/32", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["dgl"]["trainable"], rows["dgl"]["paper_count"], rows["dgl"]["inert"]) == (9_575_168, 9_575_168, 0)
    assert (rows["dgl-l"]["trainable"], rows["dgl-l"]["paper_count"], rows["dgl-l"]["inert"]) == (827_392, 827_392, 393_728)
    assert all(r["inert"] == 0 for m, r in rows.items() if m != "dgl-l")
    assert main(["params", "--backbone", "ViT-B/32"]) == 0
    assert "dgl-l 393,728" in capsys.readouterr().out
