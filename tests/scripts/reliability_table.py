"""Try every bad input of docs/reliability.md through the installed `vop` script (and a running
`vop serve`), and write the table from what actually came back: the user's line, the exit code or
HTTP status. Fails (exit 1) if any output holds a traceback or an exit code is not the expected one.

    python tests/scripts/reliability_table.py            # writes docs/reliability.md (about 3 minutes on 2 cores)
    python tests/scripts/reliability_table.py --check    # the same runs, but only compares with the file
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
TINY = "--image-size 32 --num-workers 0 -q"
TRAIN = ("data.root=world data.dataset=collection model.backbone=tiny model.frames=4 model.image_size=32 "
         "optim.batch_size=8 data.num_workers=0 eval.batch_size=8 optim.epochs=1")


def vop_exe() -> str:
    exe = shutil.which("vop", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not exe:
        sys.exit("the `vop` script is not installed: pip install -e .")
    return exe


def sh(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` as the user types it (``vop ...``), run by the shell in ``cwd``."""
    return subprocess.run(cmd.replace("vop ", vop_exe() + " ", 1), shell=True, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def seen(p: subprocess.CompletedProcess) -> str:
    """The line a user reads: the `error:` line, else the last line of a usage error, else the first
    line of the output (the one that states what was scored)."""
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    out = [ln for ln in p.stdout.splitlines() if ln.strip()]
    line = next((ln for ln in err if ln.startswith("error:")), None)
    if line is None:
        line = next((ln.strip("│ ").strip() for ln in err if "Error:" in ln or "Missing" in ln or "No such" in ln), None)
    if line is None:
        line = " / ".join(out[:2]) if out else (err[-1] if err else "")
    return line


def md(text: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > limit:
        text = text[:limit] + " ..."
    return text.replace("|", "\\|")


def prepare(t: Path) -> None:
    import torch

    import vop
    from vop.data import generate_world

    generate_world(t / "world", size="smoke")
    shutil.copytree(t / "world", t / "clean")
    for method in ("vop", "vop-f", "vop-fc"):
        torch.manual_seed(0)
        vop.save_checkpoint(vop.create_model(method, "tiny", frames=4), t / f"{method}.safetensors", extra={"backbone": "tiny"})
    (t / "dup.yaml").write_text("optim:\n  batch_size: 8\n  lr: 1.0e-3\n  batch_size: 16\n")


def restore(t: Path) -> None:
    shutil.rmtree(t / "world")
    shutil.copytree(t / "clean", t / "world")


def cli_cases():
    """(section, bad input, shell command, expected exit code, setup(t) run before, or None)."""
    V = "world/videos/test"

    def missing13(t):
        for i in range(13):
            (t / V / f"test{i:05d}.mp4").unlink()

    def missing_and_broken(t):
        (t / V / "test00003.mp4").unlink()
        f = t / V / "test00000.mp4"
        f.write_bytes(f.read_bytes()[:2000])

    def truncated(t):
        f = t / V / "test00005.mp4"
        f.write_bytes(f.read_bytes()[:3000])

    def stale_manifest(t):
        (t / V / "test00003.mp4").rename(t / "kept.mp4")
        sh("vop data verify -d collection -r world -s test", t)
        (t / "kept.mp4").rename(t / V / "test00003.mp4")

    def train_broken(n):
        def setup(t):
            for f in sorted((t / "world/videos/train").glob("*.mp4"))[:n]:
                f.write_bytes(f.read_bytes()[:2000])
        return setup

    def link_cycle(t):
        (t / V / "sub").mkdir()
        os.symlink("..", t / V / "sub" / "loop")  # sub/loop -> the test folder itself

    def run_dir(damage):
        def setup(t):
            if not (t / "run" / "state.good").exists():
                shutil.rmtree(t / "run", ignore_errors=True)
                p = sh(f"vop train -q {TRAIN} checkpoint_every=2 out_dir=run", t)
                assert p.returncode == 0, p.stderr
                shutil.copy(t / "run" / "state.pt", t / "run" / "state.good")
            good = (t / "run" / "state.good").read_bytes()
            (t / "run" / "state.pt").write_bytes(damage(good))
        return setup

    ev = f"vop eval --checkpoint vop.safetensors --dataset collection --root world {TINY}"
    return [
        ("Exit codes", "a clean split, `--strict`", "vop data verify -d collection -r world -s test --strict", 0, None),
        ("Exit codes", "one video missing, one truncated, `--strict`",
         "vop data verify -d collection -r world -s test --strict", 1, missing_and_broken),
        ("Exit codes", "unknown dataset name", "vop data verify -d nosuch -r world", 2, None),
        ("Exit codes", "a required option left out", "vop eval --dataset collection", 2, None),
        ("Exit codes", "unknown command", "vop nosuchcmd", 2, None),
        ("Exit codes", "not a number", f"{ev} --batch-size abc", 2, None),
        ("Evaluation", "13 of the 16 test videos missing", ev, 2, missing13),
        ("Evaluation", "the same, with `--allow-partial`", f"{ev} --allow-partial", 0, missing13),
        ("Evaluation", "a test video that no longer decodes (found while encoding)", ev, 2, truncated),
        ("Evaluation", "a verify manifest listing a video that was restored since", ev, 0, stale_manifest),
        ("Evaluation", "`--frames 0`", f"{ev} --frames 0", 2, None),
        ("Evaluation", "`--batch-size 0`", f"{ev} --batch-size 0", 2, None),
        ("Evaluation", "`--num-workers -1`", "vop eval --checkpoint vop.safetensors --dataset collection --root world "
                                             "--image-size 32 --num-workers -1 -q", 2, None),
        ("Evaluation", "`--postprocess qbnorm` (needs training captions)", f"{ev} --postprocess qbnorm", 2, None),
        ("Evaluation", "`--device cuda` on a machine without CUDA", f"{ev} --device cuda", 2, None),
        ("Evaluation", "a checkpoint that does not exist", ev.replace("vop.safetensors", "nosuch.safetensors"), 2, None),
        ("Evaluation", "a file that is not a checkpoint", ev.replace("vop.safetensors", "world/captions.jsonl"), 2, None),
        ("Frames", "`vop eval --frames 8` on a 4-frame VoP^F checkpoint",
         ev.replace("vop.safetensors", "vop-f.safetensors") + " --frames 8", 2, None),
        ("Frames", "`vop eval --frames 8` on a 4-frame VoP^F+C checkpoint",
         ev.replace("vop.safetensors", "vop-fc.safetensors") + " --frames 8", 2, None),
        ("Frames", "`vop index --frames 8` on a 4-frame VoP^F checkpoint (no folder is written)",
         "vop index --videos world/videos/test --checkpoint vop-f.safetensors --out ix8 --frames 8 --image-size 32 -j 0 -q"
         " ; rc=$? ; test ! -e ix8 -a ! -e .ix8.vop-building || exit 99 ; exit $rc", 2, None),
        ("Frames", "`vop eval --frames 8` on basic VoP (any frame count works)", f"{ev} --frames 8", 0, None),
        ("Config", "`optim.batch_size=0`", f"vop train -q {TRAIN} out_dir=r optim.batch_size=0", 2, None),
        ("Config", "`data.num_workers=-1`", f"vop train -q {TRAIN} out_dir=r data.num_workers=-1", 2, None),
        ("Config", "`model.frames=0`", f"vop train -q {TRAIN} out_dir=r model.frames=0", 2, None),
        ("Config", "`optim.lr=-1`", f"vop train -q {TRAIN} out_dir=r optim.lr=-1", 2, None),
        ("Config", "`data.val_fraction=1`", f"vop train -q {TRAIN} out_dir=r data.val_fraction=1", 2, None),
        ("Config", "a key given twice in the YAML file", f"vop train -q -c dup.yaml {TRAIN} out_dir=r", 2, None),
        ("Config", "a misspelt key", f"vop train -q {TRAIN} out_dir=r optim.epoch=3", 2, None),
        ("Config", "a config file that does not exist", f"vop train -q -c nosuch.yaml {TRAIN} out_dir=r", 2, None),
        ("Config", "VoP^P `n_position` > `n_video`",
         f"vop train -q {TRAIN} out_dir=r model.method=vop-p model.options.n_position=9", 2, None),
        ("Config", "VoP^C `n_context=0`", f"vop train -q {TRAIN} out_dir=r model.method=vop-c model.options.n_context=0", 2, None),
        ("Config", "VoP^F `ks` beyond the image tower's layers",
         f"vop train -q {TRAIN} out_dir=r model.method=vop-f model.options.ks=5", 2, None),
        ("Data", "1 of 16 training videos unreadable (6% of the samples), `data.max_skipped=0.1`",
         f"vop train -q {TRAIN} out_dir=r data.max_skipped=0.1",
         0, train_broken(1)),
        ("Data", "2 of 16 training videos unreadable (12.5%), default `data.max_skipped=0.01`",
         f"vop train -q {TRAIN} out_dir=r2", 2, train_broken(2)),
        ("Data", "a link cycle in a folder to index (`sub/loop -> ..`)",
         "vop index --videos world/videos/test --checkpoint vop.safetensors --out ixc --image-size 32 -j 0 -q > o.txt"
         " ; rc=$? ; grep -v '^ixc:' o.txt ; exit $rc", 0, link_cycle),  # (the first line holds timings)
        ("Resume", "`state.pt` cut in half", "vop train --resume run -q", 2, run_dir(lambda b: b[: len(b) // 2])),
        ("Resume", "`state.pt` overwritten with text", "vop train --resume run -q", 2, run_dir(lambda b: b"garbage\n")),
        ("Resume", "`state.pt` empty", "vop train --resume run -q", 2, run_dir(lambda b: b"")),
        ("Resume", "a folder that is not a run", "vop train --resume world -q", 2, None),
        ("Server", "an index folder that does not exist", "vop serve nosuch", 2, None),
    ]


def http_cases():
    """(bad request, path, Host header or None, expected status)."""
    return [
        ("`/video/NAME/²` (a Unicode digit)", "/video/ix/%C2%B2", None, 404),
        ("`/thumb/NAME/²`", "/thumb/ix/%C2%B2", None, 404),
        ("`/thumb/NAME/٣` (Arabic-Indic three)", "/thumb/ix/%D9%A3", None, 404),
        ("a 5,000-digit row", "/thumb/ix/" + "1" * 5000, None, 404),
        ("Host header of another site (DNS rebinding)", "/api/search?q=a%20circle", "attacker.example:{port}", 400),
        ("Host `localhost` (allowed)", "/api/search?q=a%20circle&k=1", "localhost:{port}", 200),
        ("a 1 MB query", "/api/search?q=" + "a" * 1_000_000, None, 413),
        ("a 2,000-character query", "/api/search?q=" + "a" * 2000, None, 400),
        ("an empty query", "/api/search?q=", None, 400),
        ("a 5 MB query (beyond the 4 MiB request head uvicorn reads)", "/api/search?q=" + "a" * 5_000_000, None, None),
    ]


def get(port: int, path: str, host: str | None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path, headers={"Host": host.format(port=port)} if host else {})
        r = c.getresponse()
        body = r.read()
        try:
            shown = json.loads(body).get("error") or f"{len(json.loads(body).get('results', []))} results"
        except ValueError:
            shown = body[:80].decode("utf-8", "replace")
        return r.status, shown
    except (ConnectionError, http.client.HTTPException) as e:
        return None, f"connection closed without a response ({type(e).__name__})"
    finally:
        c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with docs/reliability.md instead of writing it")
    args = ap.parse_args()
    problems: list[str] = []
    rows: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="vop-rel-") as tmp:
        t = Path(tmp)
        prepare(t)
        for section, what, cmd, want, setup in cli_cases():
            restore(t)
            if setup:
                setup(t)
            p = sh(cmd, t)
            out = p.stdout + p.stderr
            if "Traceback" in out:
                problems.append(f"traceback: {cmd}\n{out[-2000:]}")
            if p.returncode != want:
                problems.append(f"exit {p.returncode}, expected {want}: {cmd}\n{out[-2000:]}")
            shown = cmd.split(" ; ")[0].replace(TRAIN, "...").replace(TINY, "...").replace(" > o.txt", "")
            rows.setdefault(section, []).append(f"| {md(what)} | `{md(shown, 200)}` | {md(seen(p))} | {p.returncode} |")
            print(f"{p.returncode} {cmd[:100]}", flush=True)

        # the server: a real `vop serve` on a free port
        restore(t)
        p = sh("vop index --videos world/captions.jsonl --split test --checkpoint vop.safetensors --out ix --image-size 32 -j 0 -q", t)
        assert p.returncode == 0, p.stderr
        port = free_port()
        log_file = open(t / "serve.log", "w")  # a file, not a pipe: access-log lines of 1 MB would fill a pipe
        srv = subprocess.Popen([vop_exe(), "serve", "ix", "--port", str(port)], cwd=t, stdout=log_file,
                               stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while get(port, "/api/indexes", None)[0] != 200:
                if time.monotonic() > deadline or srv.poll() is not None:
                    raise SystemExit("vop serve did not start")
                time.sleep(0.5)
            # a second server on the same port
            p = sh(f"vop serve ix --port {port}", t)
            if "Traceback" in p.stdout + p.stderr or p.returncode != 2:
                problems.append(f"second server on a busy port: exit {p.returncode}\n{p.stderr[-2000:]}")
            rows["Server"].append(f"| the port is already in use | `vop serve ix --port PORT` | "
                                  f"{md(seen(p).replace(str(port), 'PORT'))} | {p.returncode} |")
            http_rows = []
            for what, path, host, want in http_cases():
                status, shown = get(port, path, host)
                if status != want:
                    problems.append(f"HTTP {status}, expected {want}: {what}")
                req = path if len(path) < 60 else path[:40] + f"... ({len(path)} characters)"
                h = f" (Host: {host.split(':')[0]})" if host else ""
                http_rows.append(f"| {md(what)} | `GET {md(req)}`{h} | {md(shown)} | {status or 'none'} |")
        finally:
            srv.terminate()
            srv.wait(timeout=30)
            log_file.close()
        log = (t / "serve.log").read_text(errors="replace")
        if "Traceback" in log:
            problems.append(f"traceback in the server log:\n{log[-3000:]}")

    text = render(rows, http_rows)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    if args.check:
        norm = lambda s: re.sub(r"\d+(\.\d+)? s\b|\d+\.\d+ videos/s|'\d{4,5}'|:\d{4,5}\b", "#", s)  # noqa: E731
        if norm(DOC.read_text()) != norm(text):
            problems.append(f"{DOC} differs from what the runs give: regenerate it")
            print(problems[-1], file=sys.stderr)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    return 1 if problems else 0


def render(rows: dict[str, list[str]], http_rows: list[str]) -> str:
    head = "| bad input | command | what the user sees | exit code |\n|---|---|---|---|\n"
    parts = [INTRO]
    for section, lines in rows.items():
        parts.append(f"\n### {section}\n\n{head}" + "\n".join(lines) + "\n")
    parts.append("\n### HTTP requests to `vop serve`\n\n| bad request | request | answer | HTTP status |\n|---|---|---|---|\n"
                 + "\n".join(http_rows) + "\n")
    parts.append(OUTRO)
    return "".join(parts)


INTRO = """# Reliability: bad inputs and what you see

Every row below was run through the installed `vop` script (and a running `vop serve`) by
`python tests/scripts/reliability_table.py`, which wrote this file from what came back and fails if
any output holds a Python traceback. `...` in a command stands for the tiny settings of the run
(synthetic smoke world, random `tiny` backbone, 4 frames, 32 px). Paths are relative to its
scratch folder.

Exit codes of `vop`: **0** success, **1** a check failed (`vop data verify --strict`), **2** a user
error (one `error:` line naming the file or key and what to do, or a usage message). Tests:
`tests/test_cli_reliability.py`, `tests/test_retrieval_reliability.py`.
"""

OUTRO = """
## What the rules are

- **Partial galleries.** `vop eval` states how many captions and videos of the split it scored
  ("the whole split", or "PARTIAL: scored V of N videos and T of M captions; left out ... (why)"),
  in the console and in `--json` (`split_videos`, `split_texts`, `left_out_videos`,
  `left_out_texts`, `left_out_why`, `left_out`, `partial`). It refuses, before decoding anything,
  when a video of the split is missing or listed as bad by `vop data verify`, and after encoding
  when one turns out unreadable; `--allow-partial` scores what is there, and then every number
  says "(partial)" (and `"partial": true` sits in both metric blocks of the JSON). Training
  reports the same counts in `results.json` and marks a partial test set under its summary.
- **Verify manifests** record the size and mtime of each undecodable file; an entry whose file
  was restored or changed since is checked again, never trusted blindly.
- **Unreadable training videos** are counted per epoch over all ranks, logged, and written to
  `results.json` (`skipped`, and per epoch in `history`), with a warning at the end of the run;
  above `data.max_skipped` (default 1% of an epoch's samples, missing files included) the run
  stops with the error above. `vop data verify` decodes the frames training reads (first, last,
  the test-sampled ones, a train draw), and folder walks enter each real folder once, so a link
  cycle is listed, never followed forever.
- **Frames.** VoP^P's position-specific prompts and VoP^F's frame position embedding hold one
  learned tensor per frame position: a checkpoint trained with F frames runs with F frames only
  (no interpolation: it would be a different, untrained model). `--frames` of another count is
  refused before any video is decoded; other methods take any count. `model.frames` is read-only.
- **Indexes.** A new index is built in a hidden folder next to its target
  (`.NAME.vop-building`) and renamed when complete; a failed run removes it, unless it holds
  encoded parts, which the next run picks up. Updates of an existing index switch `index.json`
  atomically, as before.
- **Configs.** Every numeric setting has a range, checked for files, overrides and configs built
  in Python; a key given twice in one YAML mapping is refused; method options (`ks`,
  `n_position`, `n_context`) are checked on a weightless (meta-device) model before any weights
  load (`ks` against a weights file's depth only once it is read, unless `model.backbone_arch`
  names its architecture).
- **Bounds before allocation.** Every number a file, option or config gives is checked for type
  (an integer is not a bool, a float or a string; a list is a list), finiteness (no NaN, no
  infinity, no 401-digit integer) and range before anything is built (`vop/limits.py` lists the
  bounds and why: at most 1024 frames per video, 4096 px, 2^20 videos per batch, 1024 prompt
  tokens of a kind, towers of at most 256 layers and 16384 wide, text prompts that leave a
  3-token caption in CLIP's context). Architecture records (`vop_clip_config`, a Hugging Face
  `config.json`, the authors' `configuration.json`, a prompt checkpoint's metadata) are checked,
  then compared with the tensors the file holds, shape by shape, before any model exists. Then a
  model whose weights, or a training step whose estimated memory (`vop/memory.py`: a lower
  bound), exceed what the CPU or GPU has free is refused, naming the options or settings
  (`optim.batch_size`, `model.frames`, `model.image_size` ...) that made it large. Tests:
  `tests/test_bounds.py`.
- **Resume.** Training writes the new `state.pt` completely, then keeps the one before as
  `state.prev.pt` (a second name, then a rename: `state.pt` never disappears); a damaged
  `state.pt` is reported with the command that resumes from the previous one.
- **Server.** Video rows are ASCII digits only. Requests whose `Host` header is not an IP
  address, `localhost`, the `--host` name (or this machine's names when bound to 0.0.0.0) or a
  `--allowed-host` name get 400: a DNS-rebinding page cannot query a local server. Query strings
  over 16 KiB get 413; uvicorn reads request heads up to 4 MiB, beyond that it closes the
  connection without a status.
"""


if __name__ == "__main__":
    sys.exit(main())
