"""`vop demo --smoke` end to end: artefacts complete and consistent; its output folder and world
checked before any work."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vop
from vop.data import generate_world


def vop_script() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("vop", path=path)
    assert exe, "the `vop` console script is not installed (pip install -e .)"
    return exe


def run_vop(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([vop_script(), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the world an earlier run with other settings left there: the demo replaces it, and says so
    generate_world(out / "world", seed=1, size="smoke")
    proc = run_vop("demo", "--smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def demo_out(demo_run):
    return demo_run[0]


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


# -- the output folder and its world ------------------------------------------------------------------

def test_a_world_of_other_settings_is_replaced_with_a_notice(demo_run, tmp_path):
    out, proc = demo_run
    world = out / "world"
    assert (f"{world} held the world of size smoke, seed 1, not the size smoke, seed 0 world asked for: "
            "replaced by a new one") in proc.stdout
    meta = json.loads((world / "world.json").read_text())
    assert meta["seed"] == 0 and meta["size"] == "smoke" and meta["generator"] == {"name": "vop.data.synth", "version": 1}
    generate_world(tmp_path / "fresh", seed=0, size="smoke")  # the same bytes as a world written afresh
    for name in ("captions.jsonl", "world.json", "stills/captions.jsonl", "stills/images.npy.gz"):
        assert (world / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert sorted(p.relative_to(world) for p in world.rglob("*.mp4")) == \
        sorted(p.relative_to(tmp_path / "fresh") for p in (tmp_path / "fresh").rglob("*.mp4"))


def test_which_world_a_folder_holds(demo_out, tmp_path):
    """Reused when it is the one asked for; another size, seed or generator, or an interrupted generation:
    written again (what it held is said); anything vop did not write: refused, never deleted."""
    from vop.demo.run import DemoSettings, world_problem
    from vop.errors import ConfigError

    world = demo_out / "world"
    assert world_problem(world, DemoSettings.smoke()) is None
    assert world_problem(world, DemoSettings()) == "the world of size smoke, seed 0"  # --ablations is "small"
    assert world_problem(world, DemoSettings.smoke(world_seed=3)) == "the world of size smoke, seed 0"
    assert world_problem(tmp_path / "none", DemoSettings()) == ""

    meta = json.loads((world / "world.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "world.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "generator"}))  # an older vop's
    assert world_problem(old, DemoSettings.smoke()) == "a world of an older generator (size smoke, seed 0)"
    (old / "world.json").write_text(json.dumps({**meta, "generator": {"name": "vop.data.synth", "version": 0}}))
    assert world_problem(old, DemoSettings.smoke()) == "a world of an older generator (size smoke, seed 0)"

    # an interrupted generation leaves a manifest that says so
    import vop.data.synth.world as synth_world

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    cut = tmp_path / "cut"
    orig, synth_world.make_stills = synth_world.make_stills, interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_world(cut, seed=0, size="smoke")
    finally:
        synth_world.make_stills = orig
    assert world_problem(cut, DemoSettings.smoke()) == "an incomplete world (size smoke, seed 0: its generation was interrupted)"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "captions.jsonl").write_text("{}\n")  # someone's own collection
    with pytest.raises(ConfigError, match=r"foreign holds something not made by vop \(no world.json written by vop: captions.jsonl\)"):
        world_problem(foreign, DemoSettings.smoke())
    (foreign / "world.json").write_text(json.dumps({"name": "my data"}))
    with pytest.raises(ConfigError, match="no world.json written by vop"):
        world_problem(foreign, DemoSettings.smoke())
    (old / "notes.txt").write_text("mine")  # vop's world.json, and a file vop does not write
    with pytest.raises(ConfigError, match="files vop's world generator does not write: notes.txt"):
        world_problem(old, DemoSettings.smoke())
    with pytest.raises(ConfigError, match="is a file, not the demo's world folder"):
        world_problem(old / "notes.txt", DemoSettings.smoke())
    with pytest.raises(ConfigError, match="unknown world size 'huge'"):
        world_problem(old, DemoSettings(world_size="huge"))


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {afile: f"{afile}: it is a file, not a folder", afile / "sub": f"{afile / 'sub'}: it lies below {afile}, which is a file"}
    if sys.platform.startswith("linux"):  # no one, root included, creates folders in /proc
        cases[Path("/proc/vop-demo-out")] = "cannot write the demo's output folder /proc/vop-demo-out: "
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").write_text("x")  # root writes there anyway: then this case proves nothing
    except PermissionError:
        cases[ro] = f"cannot write the demo's output folder {ro}: Permission denied"
    for out, says in cases.items():
        for extra in ([], ["--ablations"]):
            proc = run_vop("demo", "--smoke", *extra, "--out", out, timeout=120)
            assert proc.returncode == 2 and says in proc.stderr and "give --out a writable folder" in proc.stderr, \
                (out, proc.stderr)
            assert "[1/4]" not in proc.stdout
    ro.chmod(0o700)
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"]


def test_a_folder_not_made_by_vop_is_refused_before_any_work(tmp_path):
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "notes.txt").write_text("mine")
    proc = run_vop("demo", "--smoke", "--ablations", "--out", tmp_path, timeout=120)
    assert proc.returncode == 2 and "[2/4]" not in proc.stdout
    assert (f"{tmp_path / 'world'} holds something not made by vop (no world.json written by vop: notes.txt)"
            in proc.stderr and "use another --out, or delete" in proc.stderr)
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == ["notes.txt"]
