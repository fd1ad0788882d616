"""``bench/bench_overhead.py`` runs end to end on a tiny workload and reports what it claims:
CPU and wall time per request for both lines, the collector's passes, Python calls per request,
and a JSON that it never overwrites without ``--force``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_overhead.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=100
    )


def test_a_tiny_run_reports_both_lines_and_keeps_its_json(tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    args = ["--requests", "20", "--repeats", "1", "--concurrency", "1,4", "--count-calls"]
    done = run(*args, "--gc", "freeze", "--json", str(out))
    assert done.returncode == 0, done.stderr
    res = json.loads(out.read_text())
    one, four = res["lines"]["1"], res["lines"]["4"]
    assert set(one) == {"emtransfer", "by hand"} and set(four) == {"emtransfer"}
    for line in (one["emtransfer"], one["by hand"], four["emtransfer"]):
        assert line["cpu_us"]["median"] > 0 and line["wall_us"]["median"] > 0
    assert one["emtransfer"]["python_calls"] > 50  # a request is many calls, never none
    assert set(one["emtransfer"]["gc"]) >= {"gen0", "gen1", "gen2", "us_per_request"}
    assert "difference" in done.stdout and "Python calls per request" in done.stdout
    again = run(*args, "--json", str(out))  # an existing result is kept
    assert again.returncode != 0 and "exists" in again.stderr
    assert json.loads(out.read_text()) == res
