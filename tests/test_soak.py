"""The short variant of ``bench/soak.py``: a few hundred requests of the soak's mix (images,
payloads up to 3x the pool, half of known length) between two processes, over tcp and nixl.
The long run (10,000 requests at concurrency 256) is a benchmark; its figures are in the
README's Reliability section."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import transport_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import soak

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("transport", transport_params("tcp", "nixl"))
def test_short_soak_loses_and_corrupts_nothing(transport: str) -> None:
    r: dict[str, Any] = soak.soak(transport, requests=300, concurrency=64)
    lang, enc = r["language"], r["encode"]
    assert lang["lost"] == 0, soak.summary(r)
    assert lang["outcome"] == {"ok": 300, "corrupted": 0}, soak.summary(r)
    for side in (lang, enc):
        pool = side["pool"]
        assert pool["blocks_free"] == pool["blocks_total"], soak.summary(r)
        assert pool["blocks_quarantined"] == 0 and pool["quarantined_requests"] == 0
        assert not pool["leaks"], pool
        assert side["end"]["open_files"] - side["start"]["open_files"] < 16, soak.summary(r)
    assert lang["known_length"] > 0 and lang["known_length"] < 300
    assert lang["rounds_mean"] > 1  # the mix resumes (payloads larger than an allocation)
