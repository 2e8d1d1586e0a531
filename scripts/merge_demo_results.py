"""Merge the results.json of several `vop demo` runs on the same world and settings into one table and
Figure 1 (docs/results.md uses it for the later methods' rows next to the 13 methods of the paper).

    python scripts/merge_demo_results.py OUT.md OUT.png A/results.json B/results.json ...

Runs must share the world, backbone, frames, epochs, batch and seeds (checked); a method present in
several files must have identical numbers in each (checked: rows are deterministic per method and
seed, so splitting `vop demo --methods ...` over processes gives the same rows as one process).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vop.demo.report import table_md, twin_table_md, write_figure

SAME = ("backbone", "world_size", "world_seed", "frames", "image_size", "epochs", "batch_size", "seeds")


def merge(files: list[Path]) -> dict:
    merged: dict = {}
    for f in files:
        r = json.loads(f.read_text())
        if not merged:
            merged = {"settings": dict(r["settings"]), "methods": {}, "sources": []}
        for k in SAME:
            if r["settings"][k] != merged["settings"][k]:
                raise SystemExit(f"{f}: settings.{k} = {r['settings'][k]!r}, other runs {merged['settings'][k]!r}")
        for m, v in r["methods"].items():
            if m in merged["methods"] and merged["methods"][m]["summary"] != v["summary"]:
                raise SystemExit(f"{f}: {m} differs from another run's {m}")
            merged["methods"].setdefault(m, v)
        merged["sources"].append({"file": str(f), "wall_seconds": r.get("wall_seconds"), "date": r.get("date")})
    return merged


def main() -> None:
    out_md, out_png, *files = sys.argv[1:]
    merged = merge([Path(f) for f in files])
    Path(out_md).write_text(table_md(merged) + "\n" + twin_table_md(merged))
    write_figure(Path(out_png), merged)
    print(f"{len(merged['methods'])} methods -> {out_md}, {out_png}")


if __name__ == "__main__":
    main()
