"""MV-Adapter (``mv-adapter``): the tests of the build spec (later-methods.md, section 2 (g)) plus
checkpoints, a training step, the tokenizer budget and the command line. Forward passes on the tiny
backbone (width 64, 2 layers per tower, 16 patches, 4 frames)."""
import json

import pytest
import torch
import torch.nn.functional as F

import vop
from vop.backbone import build_clip
from vop.errors import ConfigError
from vop.methods import count_parameters, create_model

EOT = 49407


def _randomise(model, skip_up=False, std=0.5):
    """Move every adapter tensor off its initialisation (W_u, b_u too unless ``skip_up``)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_trainable_parameters():
            if name.startswith("clip."):
                continue
            if skip_up and (".up." in name):
                continue
            p.add_(std * torch.randn(p.shape, generator=g))


def _tokens():
    # [SOT] words [EOT] then zero padding, as vop's tokenizer writes them
    return torch.tensor([[49406, 320, 1929, 530, 518, EOT, 0, 0],
                         [49406, 1237, EOT, 0, 0, 0, 0, 0],
                         [49406, 320, 2368, 3466, 1395, 4558, 550, EOT]])


# -- (g) 2: counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16"])
def test_counts(arch):
    video = 12 * (768 * 64 + 64 + 64 * 768 + 768 + 128 + 49_984 + 25 * 64 + 64 + 4_160 + 2_064 + 1_024)
    text = 12 * (512 * 64 + 64 + 64 * 512 + 512 + 128 + 49_984 + 32 * 64)
    cmt = 2 * (32 + 2 * (32 * 64 + 64))
    assert (video, text, cmt) == (1_897_920, 1_419_264, 8_512)
    c = count_parameters("mv-adapter", arch, frames=12)
    assert c["trainable"] == c["counted"] == video + text + cmt == 3_325_696
    assert c["uncounted"] == 0
    with_bias = count_parameters("mv-adapter", arch, frames=12, train_clip_bias=True)
    assert with_bias["trainable"] - c["trainable"] == 171_008  # every CLIP bias, q/k/v included
    assert with_bias["trainable"] == with_bias["counted"] == 3_496_704
    # down_in: h_l maps to the tower width (and scales W_d's input columns)
    down_in = count_parameters("mv-adapter", arch, frames=12, cmt_mode="down_in")["trainable"]
    assert down_in == 3_325_696 + 2 * ((32 * 768 + 768) + (32 * 512 + 512) - 2 * (32 * 64 + 64))


def test_per_layer_shapes_on_vit_b32():
    with torch.device("meta"):
        m = create_model("mv-adapter", vop.build_clip("ViT-B-32"), frames=12)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(m.video_adapters[0]) == 158_160 and n(m.text_adapters[0]) == 118_272
    assert n(m.video_adapters[0].block) == n(m.text_adapters[0].block) == 49_984
    assert tuple(m.video_adapters[0].positions.shape) == (25, 64)  # [g; 12 CLS; 12 pooled patches]
    assert tuple(m.text_adapters[0].positions.shape) == (32, 64)
    tied = [i for i, a in enumerate(m.video_adapters) if a.factor_map is not None]
    assert tied == [i for i, a in enumerate(m.text_adapters) if a.factor_map is not None] == [10, 11]
    # on towers of other depths the default ties the last two layers of each (ViT-L/14: 24 image, 12 text)
    with torch.device("meta"):
        big = create_model("mv-adapter", vop.build_clip("ViT-L-14"), frames=12)
    assert [i for i, a in enumerate(big.video_adapters) if a.factor_map is not None] == [22, 23]
    assert [i for i, a in enumerate(big.text_adapters) if a.factor_map is not None] == [10, 11]
    assert big.factor("visual", 22) is big.factor("text", 10)


# -- (g) 1: zero-init ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"cmt_mode": "down_in"}, {"frame_norm": False}, {"train_clip_bias": True}])
def test_zero_up_projection_is_frozen_clip_exactly(options, tiny_clip, video_batch):
    """W_u = b_u = 0: every adapter returns exactly 0, whatever W_d, the temporal block, P_v, g, W_b or phi."""
    m = create_model("mv-adapter", tiny_clip, frames=4, **options).eval()
    _randomise(m, skip_up=True)
    for a in [*m.video_adapters, *m.text_adapters]:
        assert not a.up.weight.any() and not a.up.bias.any()
    assert m.cmt_factors[0].abs().sum() > 0 and m.video_adapters[0].calibrate_b.weight.abs().sum() > 0
    zs = create_model("zeroshot", tiny_clip, frames=4)
    tokens = _tokens()
    with torch.no_grad():
        frames = zs.encode_frames(video_batch)
        want = F.normalize(frames, dim=-1).mean(1) if options.get("frame_norm", True) else frames.mean(1)
        assert torch.equal(m.encode_frames(video_batch), frames)
        assert torch.equal(m.encode_video(video_batch), want)
        assert torch.equal(m.encode_text(tokens), zs.encode_text(tokens))


def test_starts_as_clip_and_moves_with_the_up_projection(tiny_clip, video_batch):
    m = create_model("mv-adapter", tiny_clip, frames=4).eval()
    zs = create_model("zeroshot", tiny_clip, frames=4)
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), zs.encode_video(video_batch))
        _randomise(m)
        assert (m.encode_video(video_batch) - zs.encode_video(video_batch)).abs().max() > 1e-3
        assert (m.encode_text(tokens) - zs.encode_text(tokens)).abs().max() > 1e-3


def test_initialisation_follows_the_spec():
    """The released code's initialisation, at ViT-B widths (stds from the tower width, not from k)."""
    from vop.methods.mv_adapter import TextAdapter, VideoAdapter

    torch.manual_seed(0)
    v, t = VideoAdapter(768, 12, 64, 2, 0.1, 32, "down_out"), TextAdapter(512, 32, 64, 2, 0.1, 32, "down_out")
    assert not v.up.weight.any() and not v.up.bias.any() and not t.up.weight.any() and not t.up.bias.any()
    assert not v.down.bias.any() and not t.down.bias.any() and not v.calibrate_b.weight.any()
    assert 0.008 < v.positions.std() < 0.012 and 0.008 < t.positions.std() < 0.012  # N(0, 0.01^2)
    assert 0.08 < v.video_token.std() < 0.18  # N(0, 1/8^2), 64 values
    assert abs(t.down.weight.std() - (2 * 512) ** -0.5) < 2e-3  # text W_d N(0, (2*512)^-1/2)
    assert abs(v.down.weight.abs().max() - (1 / 768) ** 0.5) < 1e-3  # kaiming-uniform bound 1/sqrt(fan_in)
    assert abs(v.block.attn.in_proj_weight.std() - 768 ** -0.5) < 2e-3
    assert abs(t.block.mlp.c_fc.weight.std() - (2 * 512) ** -0.5) < 2e-3
    assert not v.block.attn.in_proj_bias.any() and not v.block.attn.out_proj.bias.any()
    assert v.factor_map.bias.abs().max() <= 32 ** -0.5 and tuple(v.factor_map.weight.shape) == (64, 32)


# -- (g) 3: temporal wiring -------------------------------------------------------------------------------
def test_temporal_wiring_at_layer_0(tiny_clip, video_batch):
    """Changing frame j changes the [CLS] output of frame f != j of the layer-0 adapter, not frame f's
    patch-token outputs (patches get no temporal information)."""
    m = create_model("mv-adapter", tiny_clip, frames=4).eval()
    _randomise(m)  # W_u random
    seen = []
    hook = m.video_adapters[0].register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    other = video_batch.clone()
    j = 2
    other[:, j] = torch.randn_like(other[:, j])
    with torch.no_grad():
        m.encode_video(video_batch)
        m.encode_video(other)
    hook.remove()
    a, b = (s.view(3, 4, 17, 64) for s in seen)  # (B, F, 1 + 16 patches, width)
    for f in range(4):
        if f == j:
            assert (a[:, f] - b[:, f]).abs().amax() > 1e-3
            continue
        assert (a[:, f, 0] - b[:, f, 0]).abs().amax() > 1e-5, f  # [CLS] of frame f sees frame j
        assert torch.equal(a[:, f, 1:], b[:, f, 1:]), f  # its patches do not
    # and the frame embeddings of the other frames change (cross-frame information reaches the read-out)
    with torch.no_grad():
        ea, eb = m.encode_frames(video_batch), m.encode_frames(other)
    assert (ea[:, 0] - eb[:, 0]).abs().max() > 1e-5


def test_frame_order_matters_and_videos_are_independent(tiny_clip, video_batch):
    m = create_model("mv-adapter", tiny_clip, frames=4).eval()
    _randomise(m)
    with torch.no_grad():
        v = m.encode_video(video_batch)
        assert (v - m.encode_video(video_batch.flip(1))).abs().max() > 1e-4  # P_v: order-aware
        for i in range(3):
            assert torch.allclose(m.encode_video(video_batch[i:i + 1]), v[i:i + 1], atol=1e-5)


def test_tied_to_its_frame_count(tiny_clip):
    m = create_model("mv-adapter", tiny_clip, frames=4)
    assert "P_v" in m.frame_bound_tensor()
    with pytest.raises(ValueError, match="built for 4 frames, got 2"):
        m.encode_video(torch.randn(2, 2, 3, 32, 32))
    with pytest.raises(ConfigError, match="P_v"):
        m.check_frames(8)
    assert m.check_frames(4) == 4


# -- (g) 4: text causality and the caption budget ---------------------------------------------------------
def test_text_causality_and_padding(tiny_clip):
    m = create_model("mv-adapter", tiny_clip, frames=4).eval()
    _randomise(m)
    tokens = _tokens()
    garbage = tokens.clone()
    for row in range(2):  # rows 0 and 1 end before the last column: scribble after their [EOT]
        eot = int(tokens[row].argmax())
        garbage[row, eot + 1:] = torch.randint(1, 40000, (tokens.shape[1] - eot - 1,))
    padded = torch.cat([tokens, torch.zeros(3, 32 - tokens.shape[1], dtype=torch.long)], dim=1)
    with torch.no_grad():
        t = m.encode_text(tokens)
        assert torch.equal(m.encode_text(garbage)[:2], t[:2])  # tokens after [EOT] change nothing
        # P_t[:T] for T < text_len equals padding to text_len (the adapters are causal)
        assert torch.allclose(m.encode_text(padded), t, atol=1e-6)
        # a caption alone, cut right after its [EOT], gives its batch embedding too
        assert torch.allclose(m.encode_text(tokens[1:2, :3]), t[1:2], atol=1e-6)
        # words before [EOT] matter
        changed = tokens.clone()
        changed[0, 2] = 777
        assert (m.encode_text(changed)[0] - t[0]).abs().max() > 1e-4


def test_caption_budget_is_text_len(tiny_clip):
    m = create_model("mv-adapter", tiny_clip, frames=4)
    assert m.max_text_tokens == 32
    assert create_model("mv-adapter", tiny_clip, frames=4, text_len=20).max_text_tokens == 20
    with pytest.raises(ValueError, match="at most 32"):
        m.encode_text(torch.zeros(1, 33, dtype=torch.long))
    pytest.importorskip("instant_clip_tokenizer")
    pytest.importorskip("ftfy")
    assert m.tokenizer()(["word " * 100]).shape == (1, 32)
    assert m.tokenizer(max_words=77)(["hi"]).shape == (1, 32)
    assert m.tokenizer(max_words=16)(["hi"]).shape == (1, 16)


# -- (g) 5: cross modality tying ----------------------------------------------------------------------------
def test_cmt_factor_is_one_tensor_whose_gradient_sums_both_towers(tiny_clip, video_batch):
    m = create_model("mv-adapter", tiny_clip, frames=4).train()
    _randomise(m)
    last = tiny_clip.cfg.vision.layers - 1
    phi = m.factor("visual", last)
    assert phi is m.factor("text", tiny_clip.cfg.text.layers - 1) is m.cmt_factors[-1]
    assert sum(1 for n, _ in m.named_parameters() if n.startswith("cmt_factors.")) == 2  # stored once
    tokens = _tokens()
    probe_v, probe_t = torch.randn(3, 64), torch.randn(3, 64)

    def grad(video_part, text_part):
        m.zero_grad()
        loss = 0
        if video_part:
            loss = loss + (m.encode_video(video_batch) * probe_v).sum()
        if text_part:
            loss = loss + (m.encode_text(tokens) * probe_t).sum()
        loss.backward()
        return [p.grad.clone() for p in m.cmt_factors]

    gv, gt, both = grad(True, False), grad(False, True), grad(True, True)
    for a, b, c in zip(gv, gt, both):
        assert a.abs().sum() > 0 and b.abs().sum() > 0
        assert torch.allclose(c, a + b, atol=1e-6)


@pytest.mark.parametrize("mode", ["down_out", "down_in"])
def test_cmt_with_zero_factor_and_unit_bias_is_the_untied_adapter(mode, tiny_clip, video_batch):
    """phi = 0 and h_l's bias all ones: c = 1, so W_d is unchanged and the model equals the untied one."""
    untied = create_model("mv-adapter", tiny_clip, frames=4, cmt_layers=[], cmt_mode=mode).eval()
    _randomise(untied)
    tied = create_model("mv-adapter", tiny_clip, frames=4, cmt_mode=mode).eval()
    missing = tied.load_state_dict(untied.state_dict(), strict=False).missing_keys
    assert missing and all(".factor_map." in k or k.startswith("cmt_factors.") for k in missing)
    assert len(untied.cmt_factors) == 0 and all(a.factor_map is None for a in untied.video_adapters)
    with torch.no_grad():
        for a in [*tied.video_adapters, *tied.text_adapters]:
            if a.factor_map is not None:
                a.factor_map.weight.normal_()  # irrelevant while phi = 0
                a.factor_map.bias.fill_(1.0)
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(tied.encode_video(video_batch), untied.encode_video(video_batch))
        assert torch.equal(tied.encode_text(tokens), untied.encode_text(tokens))
        tied.cmt_factors[0].fill_(0.3)  # a non-zero factor modulates
        assert (tied.encode_text(tokens) - untied.encode_text(tokens)).abs().max() > 1e-4


def test_cmt_layers_option(tiny_clip):
    m = create_model("mv-adapter", "tiny-4l", frames=4, cmt_layers=[1, -1])
    assert [i for i, a in enumerate(m.video_adapters) if a.factor_map is not None] == [1, 3]
    assert m.factor("visual", 3) is m.factor("text", 3) is m.cmt_factors[1]
    assert create_model("mv-adapter", tiny_clip, frames=4, cmt_layers=(0, 1)).opts.cmt_layers == [0, 1]
    with pytest.raises(ConfigError, match="not a layer"):
        create_model("mv-adapter", tiny_clip, frames=4, cmt_layers=[2])
    with pytest.raises(ConfigError, match="twice"):
        create_model("mv-adapter", tiny_clip, frames=4, cmt_layers=[1, -1])
    with pytest.raises(ConfigError, match="cmt_mode"):
        create_model("mv-adapter", tiny_clip, frames=4, cmt_mode="up_out")
    with pytest.raises(ConfigError, match="multiple of heads"):
        create_model("mv-adapter", tiny_clip, frames=4, mid=63)
    with pytest.raises(ConfigError, match="text_len"):
        create_model("mv-adapter", tiny_clip, frames=4, text_len=78)
    with pytest.raises(ConfigError, match="true or false"):
        create_model("mv-adapter", tiny_clip, frames=4, frame_norm=1)


# -- optimiser, training, checkpoints ---------------------------------------------------------------------
def test_weight_decay_and_learning_rate_groups(tiny_clip):
    from vop.engine.optim import param_groups

    m = create_model("mv-adapter", tiny_clip, frames=4, train_clip_bias=True)
    no_decay = m.no_weight_decay()
    assert {"video_adapters.0.positions", "video_adapters.0.video_token", "text_adapters.1.positions",
            "cmt_factors.0", "video_adapters.0.down.bias", "text_adapters.0.ln.weight"} <= no_decay
    assert not {"video_adapters.0.down.weight", "text_adapters.0.up.weight", "video_adapters.1.factor_map.weight",
                "video_adapters.0.block.attn.in_proj_weight", "video_adapters.0.calibrate_a.weight"} & no_decay
    groups = {g["name"]: g for g in param_groups(m, 5e-6, 1e-7, 0.2)}
    assert set(groups) == {"new-decay", "new-no_decay", "backbone-no_decay"}  # CLIP biases: 1-d, no decay
    assert groups["backbone-no_decay"]["lr"] == 1e-7 and groups["new-decay"]["weight_decay"] == 0.2
    assert sum(p.numel() for p in groups["backbone-no_decay"]["params"]) == sum(
        p.numel() for n, p in tiny_clip.named_parameters() if n.endswith((".bias", ".in_proj_bias")))
    facts = vop.method_facts("mv-adapter")
    assert (facts.rates.lr, facts.rates.backbone_lr, facts.backbone, facts.label) == (5e-6, 1e-7, "frozen", "MV-Adapter")


@pytest.mark.parametrize("train_clip_bias", [False, True])
def test_one_training_step_changes_only_trainable_tensors(train_clip_bias, video_batch):
    from vop.engine.optim import param_groups

    torch.manual_seed(0)
    m = create_model("mv-adapter", build_clip("tiny", seed=0), frames=4, mid=16, train_clip_bias=train_clip_bias).train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, _ in m.named_trainable_parameters()}
    opt = torch.optim.AdamW(param_groups(m, 1e-3, 1e-3, 0.2))
    v, t = m(video_batch, _tokens())
    logits = m.logit_scale * t @ v.t()
    labels = torch.arange(3)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    ups = {n for n in trainable if ".up." in n}
    assert len(ups) == 2 * (2 + 2) and ups <= changed  # W_u, b_u of 2 video + 2 text adapters moved
    clip_biases = {n for n in trainable if n.startswith("clip.")}
    assert bool(clip_biases) == train_clip_bias and clip_biases <= changed
    assert m.parameter_counts()["trainable"] == sum(p.numel() for n, p in m.named_parameters() if n in trainable)


def test_grad_checkpointing_same_gradients(tiny_clip, video_batch):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = create_model("mv-adapter", tiny_clip, frames=4).train().set_grad_checkpointing(ckpt)
        _randomise(m)
        v, t = m(video_batch, _tokens())
        (t @ v.t()).trace().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_trainable_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("options", [{}, {"cmt_layers": [0], "cmt_mode": "down_in", "frame_norm": False, "mid": 16},
                                     {"train_clip_bias": True}])
def test_checkpoint_round_trip(options, tmp_path, video_batch):
    from safetensors.torch import load_file

    m = create_model("mv-adapter", build_clip("tiny", seed=0), frames=4, **options).eval()
    _randomise(m)
    with torch.no_grad():
        for n, p in m.named_trainable_parameters():
            if n.startswith("clip."):
                p.add_(0.1 * torch.randn_like(p))
    path = vop.save_checkpoint(m, tmp_path / "mva.safetensors")
    meta = vop.read_checkpoint_meta(path)
    assert meta["method"] == "mv-adapter" and meta["frames"] == 4
    assert set(load_file(str(path))) == set(m.trainable_state_dict())
    m2 = vop.load_checkpoint(path, build_clip("tiny", seed=0)).eval()
    assert m2.options_dict() == m.options_dict()
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), m2.encode_video(video_batch))
        assert torch.equal(m.encode_text(tokens), m2.encode_text(tokens))
    # loading into a model built here (tuple spelling of cmt_layers included)
    from vop.methods.checkpoint import load_trainable

    again = {**options, **({"cmt_layers": tuple(options["cmt_layers"])} if "cmt_layers" in options else {})}
    m3 = create_model("mv-adapter", build_clip("tiny", seed=0), frames=4, **again).eval()
    load_trainable(m3, path)
    with torch.no_grad():
        assert torch.equal(m.encode_video(video_batch), m3.encode_video(video_batch))


def test_params_command_lists_it(capsys):
    from vop.cli.main import main

    assert main(["params", "--backbone", "ViT-B/32", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mv-adapter"]["trainable"] == rows["mv-adapter"]["paper_count"] == 3_325_696
