"""bench/bench_cuda.py off-GPU: the dry run (``BENCH_DEVICE=cpu``, DRAM pools, tiny sizes) runs
the whole script between its two processes and its JSON has every line (a)-(d), the resume row,
the ratios, the targets and verified payloads; the start-up checks fail in one line. The VRAM
specifics (memory type, device id, CUDA synchronisation) need a GPU and are not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import bench_cuda as bc

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def _nixl_missing() -> str | None:
    try:
        from emtransfer.transport.nixl import NixlTransport
    except ImportError as exc:
        return f"emtransfer's nixl transport cannot be imported: {exc}"
    return NixlTransport.unavailable()


def _run(*args: str, device: str = "cpu", timeout: float = 45) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENCH_DEVICE": device}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_cuda.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dry_run_reports_every_line_the_resume_row_and_the_targets(tmp_path: Path) -> None:
    if why := _nixl_missing():
        pytest.skip(f"nixl not usable here: {why}")
    out = tmp_path / "cuda.json"
    args = ("--sizes-mib", "1", "--reps", "2", "--warmup", "1")
    proc = _run(*args, "--default-mib", "1", "--resume-mib", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DRY RUN" in proc.stdout and "targets (reported, not asserted)" in proc.stdout
    result = json.loads(out.read_text())
    cfg = result["config"]
    assert cfg["dry_run"] is True and cfg["mem"] == "DRAM" and cfg["device"] == "cpu"
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"1 MiB", "resume 2 MiB"}
    for row in rows.values():
        assert set(row["lines"]) == {"a", "b", "c", "d"}
        for line in row["lines"].values():
            assert line["gbps"] > 0 and line["p50_ms"] > 0 and line["p99_ms"] >= line["p50_ms"]
        assert row["lines"]["a"]["method"] in bc.RAW_METHODS
        assert set(row["a_methods"]) == set(bc.RAW_METHODS)
        assert set(row["ratios"]) == {"c/b", "d/a"} and all(v > 0 for v in row["ratios"].values())
        assert row["verified"] == {"a": True, "b": True, "c": True}
    assert rows["1 MiB"]["expected_tokens"] == 128 and rows["1 MiB"]["rounds"]["c"] == 1
    resume = rows["resume 2 MiB"]
    assert resume["resume"] and resume["expected_tokens"] is None and resume["rounds"]["c"] >= 2
    one = rows["1 MiB"]
    fixed = one["lines"]["c"]["p50_ms"] - one["lines"]["b"]["p50_ms"]
    assert one["fixed_cost_ms"] == pytest.approx(fixed)
    targets = {(t["payload"], t["what"]): t for t in result["targets"]}
    assert targets[("1 MiB", "fixed cost ms")]["value"] == pytest.approx(fixed)
    assert targets[("64 MiB", "c/b")]["value"] is None  # not in --sizes-mib: not measured
    assert targets[("resume 2 MiB", "d/a")]["target"] == "report"
    assert result["verified"] is True
    # an existing JSON is kept unless --force
    again = _run(*args, "--json", str(out))
    assert again.returncode == 2 and "not overwritten" in again.stderr


def test_no_cuda_gpu_fails_in_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    proc = _run("--sizes-mib", "1", device="cuda:0", timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_preflight_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from emtransfer.transport.nixl import NixlTransport

    monkeypatch.setattr(
        NixlTransport, "unavailable", classmethod(lambda cls: "nixl cannot be imported:\n x")
    )
    assert bc.preflight(torch.device("cpu")) == "nixl cannot be imported: x"
    monkeypatch.setattr(NixlTransport, "unavailable", classmethod(lambda cls: None))

    def no_vram(device: torch.device, write: bool = True) -> None:
        raise RuntimeError("cannot register VRAM memory: unsupported\nmemory type")

    monkeypatch.setattr(bc, "probe", no_vram)
    why = bc.preflight(torch.device("cpu"))
    assert (
        why == "nixl cannot move DRAM on cpu: cannot register VRAM memory: unsupported memory type"
    )


def test_probe_writes_dram_between_two_agents() -> None:
    if why := _nixl_missing():
        pytest.skip(f"nixl not usable here: {why}")
    bc.probe(torch.device("cpu"))  # the VRAM variant of the same code needs a GPU
    bc.probe(torch.device("cpu"), write=False)
