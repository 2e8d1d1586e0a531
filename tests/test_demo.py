"""`vop demo --smoke` end to end: artefacts complete and consistent."""
import json
import re
from pathlib import Path

import pytest

import vop


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    from vop.cli.main import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--smoke", "--out", str(out)]) == 0
    return out


def test_artefacts_complete(demo_out):
    for f in ("results.json", "results.md", "figure1.png", "qualitative.html"):
        assert (demo_out / f).stat().st_size > 0, f
    assert (demo_out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_method_and_counts_match_params(demo_out):
    from vop.cli.params import params_table

    res = json.loads((demo_out / "results.json").read_text())
    methods = res["methods"]
    assert list(methods) == ["zeroshot", "full", "vop", "vop-p", "vop-f", "vop-fc"]
    clip = vop.load_clip(res["settings"]["backbone"])
    table = {r["method"]: r for r in params_table(clip.cfg, res["settings"]["frames"])}
    md = (demo_out / "results.md").read_text()
    for m, r in methods.items():
        assert r["counts"]["trainable"] == table[m]["trainable"], m
        pct = 100 * r["counts"]["trainable"] / r["counts"]["backbone"]
        assert pct == pytest.approx(table[m]["percent"])
        assert f"{r['counts']['trainable']:,} | {pct:.3f}" in md
        for run in r["runs"]:
            for d in ("t2v", "v2t"):
                m_ = run["test"][d]
                assert all(0 <= m_[k] <= 100 for k in ("R1", "R5", "R10"))
                assert m_["R1"] <= m_["R5"] <= m_["R10"]
                assert 1 <= m_["MdR"] <= 16 and 1 <= m_["MnR"] <= 16
            assert 0 <= run["diagnostics"]["temporal_R1"] <= 100
            diag = run["diagnostics"]
            assert 0 <= diag["twin_accuracy"] <= 100
            # smoke world: 4 reversed pairs (8 captions) and 2 swapped pairs (4 captions)
            assert 0 <= diag["twin_accuracy_reversed"] <= 100 and 0 <= diag["twin_accuracy_swapped"] <= 100
            assert (8 * diag["twin_accuracy_reversed"] + 4 * diag["twin_accuracy_swapped"]) / 12 == pytest.approx(diag["twin_accuracy"])
    assert res["wall_seconds"] > 0 and res["peak_rss_mib"] > 0


def test_html_references_existing_images(demo_out):
    html = (demo_out / "qualitative.html").read_text()
    srcs = re.findall(r"src='([^']+)'", html)
    assert len(srcs) >= 5
    for s in srcs:
        assert (demo_out / s).is_file(), s
    assert "class='hit'" in html or "class=\"hit\"" in html


def test_temporal_analysis_script(demo_out):
    """scripts/temporal_analysis.py (the numbers of docs/results.md) runs on a demo folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("temporal_analysis", Path(__file__).parents[1] / "scripts" / "temporal_analysis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main([str(demo_out)])
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == {"zeroshot", "full", "vop", "vop-p", "vop-f", "vop-fc"}
    for name, r in rows.items():
        assert r["R1"] <= r["R1_optimistic"] + 1e-9, name  # random tie-breaking never beats optimistic
        assert r["distance_random"] > 0.01
    for name in ("zeroshot", "full", "vop"):  # frame averaging: a reversed twin gets the same embedding
        assert abs(rows[name]["distance_reversed"]) < 1e-5, name
    assert rows["vop-f"]["reversed_exact_ties"] == 0
    assert report["frame_position"]["position_rms"] > 0 and report["frame_position"]["token_norm"] > 0
    assert 0 <= report["inverse_partner"]["p_partner"] <= 1


def test_eta_from_measured_progress():
    """The training phase's remaining time: a method's later seeds take what its first took;
    methods not run yet take the mean of those measured."""
    from vop.demo.run import Eta

    eta = Eta(["full", "vop", "vop-c"], seeds=2)
    assert eta.left == 6
    eta.done("full", 100.0)
    assert eta.remaining_seconds() == 500.0  # 1 full (100) + 2 vop + 2 vop-c at the mean (100)
    eta.done("full", 120.0)
    eta.done("vop", 50.0)
    assert eta.remaining_seconds() == 50.0 + 2 * (270.0 / 3)
    assert "3/6 trainings done" in eta.report() and "min left" in eta.report()
