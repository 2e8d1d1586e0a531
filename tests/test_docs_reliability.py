"""docs/reliability.md is written by tests/scripts/reliability_table.py from real runs of the `vop` script
(minutes: run it by hand after changing a case, and `--check` to compare). This test runs nothing: it
checks that the file holds the script's fixed text and one row, with the expected exit code or HTTP
status, for every case the script has, so that a case added or changed without regenerating the file
is caught."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reliability_table", ROOT / "tests" / "scripts" / "reliability_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_doc_holds_a_row_for_every_case():
    m = _script()
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert doc.startswith(m.INTRO) and doc.endswith(m.OUTRO)
    assert "\n## What vop treats as untrusted input\n" in doc
    lines = doc.splitlines()

    def row(what: str) -> str:
        found = [ln for ln in lines if ln.startswith(f"| {m.md(what)} | ")]
        assert found, f"no row for {what!r}: regenerate docs/reliability.md (python tests/scripts/reliability_table.py)"
        return found[0]

    cases = m.cli_cases()
    table_rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| bad input |", "| bad request |"))]
    assert len(table_rows) == len(cases) + 1 + len(m.http_cases())  # + the busy port of `vop serve`: no stale rows
    for section, what, _cmd, want, *_ in cases:
        assert f"\n### {section}\n" in doc, section
        assert row(what).endswith(f" | {want} |"), what
    for what, _path, _host, status in m.http_cases():
        assert row(what).endswith(f" | {status or 'none'} |"), what
