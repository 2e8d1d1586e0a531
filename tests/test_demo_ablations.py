"""`vop demo --ablations --smoke` end to end: the tables' structure, shared runs, and that every
ablated model really has the ablated shape; the ablation configs are up to date."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

import vop

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def abl_out(tmp_path_factory):
    from vop.cli.main import main

    out = tmp_path_factory.mktemp("ablations")
    assert main(["demo", "--ablations", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def res(abl_out):
    return json.loads((abl_out / "ablations.json").read_text())


def test_artefacts(abl_out, res):
    for f in ("ablations.json", "ablations.md", "ablations.png"):
        assert (abl_out / f).stat().st_size > 0, f
    assert (abl_out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["complete"] and res["wall_seconds"] > 0 and res["peak_rss_mib"] > 0
    assert res["machine"]["cpus"] and len(res["load_average"]["start"]) == 3


def test_table_structure_and_shared_runs(abl_out, res):
    L = res["layers"]
    assert L == 4  # the tiny CLIP
    abls = {a["name"]: a for a in res["ablations"]}
    assert list(abls) == ["modality", "depth", "length", "ks"]
    keys = {name: [r["run"] for r in a["rows"]] for name, a in abls.items()}
    assert keys["modality"] == ["zeroshot", "vop[n_video=0]", "vop[n_text=0]", "vop"]
    assert keys["depth"] == ["vop[depth=1]", "vop[depth=2]", "vop", "vop[depth=2,prompt_from=output]"]
    assert keys["length"] == ["vop[n_text=1,n_video=1]", "vop[n_text=2,n_video=2]", "vop[n_text=4,n_video=4]", "vop",
                              "vop[n_text=16,n_video=16]"]
    assert keys["ks"] == [f"vop-f[ks={k}]" for k in range(L)] + ["vop"]  # K_s = L is basic VoP: its run is reused
    assert [r["x"] for r in abls["length"]["rows"]] == [1, 2, 4, 8, 16]
    assert [r["x"] for r in abls["ks"]["rows"]] == list(range(L + 1))
    # basic VoP with its defaults is "both", "every layer" and "8 tokens": one run, trained once per seed
    distinct = {k for ks in keys.values() for k in ks}
    assert set(res["runs"]) == distinct
    assert res["rows"] == 18 and res["distinct_runs"] == len(distinct) == 15 and res["distinct_trainings"] == 14
    seeds = res["settings"]["seeds"]
    trained_dirs = {p.name for p in (abl_out / "runs").iterdir()}
    assert len(trained_dirs) == 14 * seeds
    md = (abl_out / "ablations.md").read_text()
    for a in res["ablations"]:
        assert f"## {a['title']}" in md and a["claim"] in md
        for r in a["rows"]:
            entry = res["runs"][r["run"]]
            assert f"| {r['label']} | `{r['run']}` | {entry['counts']['trainable']:,} |" in md
        assert a["verdicts"]
        for v in a["verdicts"]:
            assert v["verdict"] in ("holds", "differs", "within the seed spread")
            assert v["margin"] == pytest.approx(v["a_R1"] - v["b_R1"])
            assert f"**{v['verdict']}**" in md
    for key, entry in res["runs"].items():
        assert len(entry["runs"]) == (1 if key == "zeroshot" else seeds)
        for run in entry["runs"]:
            for d in ("t2v", "v2t"):
                m = run["test"][d]
                assert 0 <= m["R1"] <= m["R5"] <= m["R10"] <= 100
            assert run["train_seconds"] >= 0
        assert entry["summary"]["t2v"]["R1"]["mean"] == pytest.approx(
            sum(r["test"]["t2v"]["R1"] for r in entry["runs"]) / len(entry["runs"]))


def _model(abl_out, entry):
    clip = vop.methods.resolve_backbone("tiny-clip")
    return vop.load_checkpoint(abl_out / entry["runs"][0]["checkpoint"], clip)


def test_every_ablated_model_has_the_ablated_shape(abl_out, res):
    L, runs = res["layers"], res["runs"]
    clip = vop.methods.resolve_backbone("tiny-clip")
    dt, dv = clip.tower_config("text").width, clip.tower_config("visual").width
    for key, entry in runs.items():
        if key == "zeroshot":
            assert entry["shapes"] == {} and entry["counts"]["trainable"] == 0
            continue
        model = _model(abl_out, entry)
        shapes = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        assert shapes == entry["shapes"], key  # the JSON records the checkpoint's shapes
        assert entry["counts"]["trainable"] == sum(math.prod(s) for s in shapes.values()), key
        opts = model.options_dict()
        assert {k: opts[k] for k in entry["options"]} == entry["options"], key
        if entry["method"] == "vop":
            n_text, n_video, depth = entry["options"].get("n_text", 8), entry["options"].get("n_video", 8), entry["options"].get("depth", L)
            text = shapes.get("text_prompts.tokens")
            video = shapes.get("video_prompts.source.shared")
            assert text == ([depth, n_text, dt] if n_text else None), key  # n_text=0: no text prompt parameters
            assert video == ([depth, n_video, dv] if n_video else None), key  # n_video=0: no video prompt parameters
            assert set(shapes) == {n for n, s in (("text_prompts.tokens", text), ("video_prompts.source.shared", video)) if s}
            if n_video:  # prompts are written into the first `depth` layers (the last, from the output) and no other
                src = model.video_prompts.source
                x = __import__("torch").zeros(2, 3, dv)
                first = L - depth if entry["options"].get("prompt_from") == "output" else 0
                assert [src.tokens(i, x, 1, 2) is not None for i in range(L)] == [first <= i < first + depth for i in range(L)], key
        else:
            assert entry["method"] == "vop-f"
            ks = entry["options"]["ks"]
            assert model.video_prompts.ks == ks
            assert shapes["text_prompts.tokens"] == [L, 8, dt]
            assert shapes.get("video_prompts.shallow.shared") == ([ks, 8, dv] if ks else None), key
            assert shapes.get("video_prompts.deep") == ([L - ks, 8, dv] if ks < L else None), key
            assert ("video_prompts.frame_position" in shapes) == (ks < L), key


def test_verdict_rule():
    from vop.demo.ablations import verdicts

    def runs(**r1):
        return {k: {"summary": {"t2v": {"R1": {"mean": m, "std": s}}}} for k, (m, s) in r1.items()}

    abl = {"rows": [{"label": "a", "run": "A"}, {"label": "b", "run": "B"}, {"label": "c", "run": "C"}]}
    v = verdicts(abl, runs(A=(20.0, 0.3), B=(19.0, 0.4), C=(10.0, 1.0)), [("gt", "a", "b"), ("gt", "a", "c"), ("gt", "c", "a")])
    assert [x["verdict"] for x in v] == ["holds", "holds", "differs"]  # spread of a-b: 0.5 < margin 1.0
    v = verdicts(abl, runs(A=(20.0, 1.0), B=(19.5, 1.0), C=(10.0, 1.0)), [("gt", "a", "b"), ("competitive", "b", "")])
    assert v[0]["verdict"] == "within the seed spread" and v[0]["spread"] == pytest.approx(2 ** 0.5)
    assert v[1]["b"] == "a" and v[1]["verdict"] == "holds"  # b within the spread of the best other row
    v = verdicts(abl, runs(A=(20.0, 0.1), B=(19.0, 0.1), C=(10.0, 1.0)), [("competitive", "b", "")])
    assert v[0]["verdict"] == "differs"


def test_ablation_configs_up_to_date():
    spec = importlib.util.spec_from_file_location("make_configs", ROOT / "configs" / "make_configs.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    files = mc.ablation_configs()
    folder = ROOT / "configs" / "msrvtt-9k" / "ablations"
    assert {p.name for p in folder.glob("*.yaml")} == set(files), "run configs/make_configs.py"
    for name, text in files.items():
        assert (folder / name).read_text() == text, f"{name} is stale: run configs/make_configs.py"
    from vop.engine.config import RunConfig, load_config
    from vop.methods.registry import parse_options

    base = load_config(RunConfig, ROOT / "configs" / "msrvtt-9k" / "vop.yaml")
    for name in files:
        cfg = load_config(RunConfig, folder / name)
        method = vop.methods.get_method(cfg.model.method)
        parse_options(cfg.model.method, method.Options, cfg.model.options)  # names and types the method accepts
        if cfg.model.method == "vop":  # the main VoP recipe, one ablated option
            assert (cfg.optim, cfg.data, cfg.eval) == (base.optim, base.data, base.eval)
            assert len(cfg.model.options) <= 2 and cfg.model.frames == base.model.frames
