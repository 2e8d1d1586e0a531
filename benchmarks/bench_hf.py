"""Our CLIP towers against Hugging Face ``CLIPModel``: same weights, same attention backend (SDPA).

A ViT-B/32-sized ``CLIPModel`` is built from a ``transformers.CLIPConfig`` with random weights and
``attn_implementation="sdpa"``, saved with ``save_pretrained`` to a temporary folder and loaded with
``vop.load_clip(folder)``. The outputs are compared first (image and text embeddings must agree to
float tolerance, else the script stops), then the forward passes are timed interleaved:
``encode_image`` vs ``get_image_features`` on N frames, ``encode_text`` vs ``get_text_features`` on B
captions, both in inference mode; then forward + backward with frozen weights and the gradient taken
to the class embedding / text position embedding only (as in prompt tuning: every block propagates
input gradients, none computes weight gradients; off with ``--no-backward``). Ratio = ours / Hugging
Face (< 1: ours faster).

    python benchmarks/bench_hf.py                       # ViT-B/32, 24 frames, 24 captions (~2 min)
    python benchmarks/bench_hf.py --tiny --repeats 2 --no-doc --json /tmp/h.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def hf_config(tiny: bool):
    from transformers import CLIPConfig

    if not tiny:
        return CLIPConfig()  # the defaults are ViT-B/32: 768-wide 12-layer image tower, patch 32, 224 px
    return CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=64)


def _features(out):
    return getattr(out, "pooler_output", out)  # transformers >= 5 returns a model output here


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=24, help="images per forward (default: %(default)s)")
    p.add_argument("--captions", type=int, default=24, help="captions per forward (default: %(default)s)")
    p.add_argument("--words", type=int, default=32, help="tokens per caption incl. [SOT]/[EOT] (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-backward", dest="backward", action="store_false", help="time forward passes only")
    p.add_argument("--tiny", action="store_true", help="a tiny config (smoke test)")
    C.add_timing_args(p)
    C.add_common_args(p, "hf_vitb32_cpu")
    args = p.parse_args()

    import torch
    import transformers
    from transformers import CLIPModel

    import vop

    C.set_threads(args.threads)
    torch.manual_seed(0)
    meta = {**C.machine_meta("cpu", args.threads or None), "transformers": transformers.__version__}
    hf = CLIPModel._from_config(hf_config(args.tiny), attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial biases and norms, so a misplaced tensor would show
        for name, prm in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                prm.add_(0.05 * torch.randn_like(prm))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = vop.load_clip(tmp).eval()
    size = ours.cfg.vision.image_size
    images = torch.randn(args.frames, 3, size, size)
    tokens = C.caption_tokens(args.captions, args.words)

    with torch.inference_mode():
        ref_i, ref_t = _features(hf.get_image_features(pixel_values=images)), _features(hf.get_text_features(input_ids=tokens))
        got_i, got_t = ours.encode_image(images), ours.encode_text(tokens)
    err = {"image_max_abs": (got_i - ref_i).abs().max().item(), "text_max_abs": (got_t - ref_t).abs().max().item(),
           "image_scale": ref_i.abs().max().item(), "text_scale": ref_t.abs().max().item()}
    print(f"  max |ours - hf|: image {err['image_max_abs']:.2e} (of {err['image_scale']:.2f}), "
          f"text {err['text_max_abs']:.2e} (of {err['text_scale']:.2f})", flush=True)
    if not (torch.allclose(got_i, ref_i, atol=1e-4, rtol=1e-4) and torch.allclose(got_t, ref_t, atol=1e-4, rtol=1e-4)):
        raise SystemExit("outputs differ from Hugging Face's: the timing would not be a fair comparison")

    fns = {
        ("image", "forward", "ours"): lambda: ours.encode_image(images),
        ("image", "forward", "hf"): lambda: hf.get_image_features(pixel_values=images),
        ("text", "forward", "ours"): lambda: ours.encode_text(tokens),
        ("text", "forward", "hf"): lambda: hf.get_text_features(input_ids=tokens),
    }
    with torch.inference_mode():
        tt = C.time_calls(fns, args.repeats)
    if args.backward:
        # frozen towers, gradient to the embeddings only (as in prompt tuning: every block propagates
        # input gradients, no weight gradients): the class embedding, the text position embedding
        for m in (hf, ours):
            m.requires_grad_(False)
        ours.visual.class_embedding.requires_grad_(True)
        ours.positional_embedding.requires_grad_(True)
        hf.vision_model.embeddings.class_embedding.requires_grad_(True)
        hf.text_model.embeddings.position_embedding.weight.requires_grad_(True)

        def back(f):
            def run():
                _features(f()).sum().backward()
            return run

        fb = {
            ("image", "forward+backward", "ours"): back(lambda: ours.encode_image(images)),
            ("image", "forward+backward", "hf"): back(lambda: hf.get_image_features(pixel_values=images)),
            ("text", "forward+backward", "ours"): back(lambda: ours.encode_text(tokens)),
            ("text", "forward+backward", "hf"): back(lambda: hf.get_text_features(input_ids=tokens)),
        }
        tt.update(C.time_calls(fb, args.repeats))
    t = C.pick(tt, args.clock)
    rows = []
    for tower, mode in dict.fromkeys((k[0], k[1]) for k in t):
        a, b = C.median(t[(tower, mode, "ours")]), C.median(t[(tower, mode, "hf")])
        rows.append({"tower": tower, "mode": mode, "ours_s": a, "hf_s": b, "ratio": a / b,
                     "ours_s_all": t[(tower, mode, "ours")], "hf_s_all": t[(tower, mode, "hf")]})
    meta.update(frames=args.frames, captions=args.captions, words=args.words, repeats=args.repeats,
                tiny=args.tiny, loadavg_end=C.loadavg(), clock=args.clock)
    L = [f"Measured {C.describe(meta)}, transformers {transformers.__version__}; "
         f"{'tiny' if args.tiny else 'ViT-B/32'}-sized random weights, float32, SDPA in both; {args.frames} frames at "
         f"{size} px, {args.captions} captions x {args.words} tokens; median of {args.repeats} interleaved repeats; "
         f"outputs agree to {max(err['image_max_abs'], err['text_max_abs']):.1e}; {'CPU' if args.clock == 'cpu' else 'wall'} "
         "time. `python benchmarks/bench_hf.py`.", "",
         "| tower | pass | ours (ms) | Hugging Face (ms) | ours / HF |", "| --- | --- | ---: | ---: | ---: |"]
    L += [f"| {r['tower']} | {r['mode']} | {r['ours_s'] * 1e3:.1f} | {r['hf_s'] * 1e3:.1f} | {r['ratio']:.2f} |"
          for r in rows]
    worst = max(r["ratio"] for r in rows if r["mode"] == "forward")
    verdict = "met" if worst <= 1.0 else ("missed, but within noise: parity" if worst <= 1.03 else "missed")
    L += ["", f"Target: ours not slower on forward (ratio <= 1.0): {verdict} (worst forward ratio {worst:.2f}; "
          "repeats scatter by ~3%, so differences under that are noise)."]
    md = "\n".join(L)
    print(md)
    C.write_json(args.json, {"meta": meta, "agreement": err, "results": rows})
    C.finish(args, "hf", md)


if __name__ == "__main__":
    main()
