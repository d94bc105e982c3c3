"""benchmarks/placement_speed.py: it times every worker count on the same drawn masks and records
that each gave the in-process result (it refuses to write a figure otherwise)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import placement_speed  # noqa: E402


def test_rows_per_worker_count_all_identical(tmp_path):
    out = tmp_path / "p.json"
    assert placement_speed.main(["--n", "8", "--workers", "0,1", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["workers"] for r in doc["rows"]] == [0, 1]
    assert all(r["identical_to_first"] and r["passed"] == 8 and r["ms_per_mask"] > 0 for r in doc["rows"])
    assert doc["command"].startswith("python benchmarks/placement_speed.py")
