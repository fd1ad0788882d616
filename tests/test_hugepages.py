"""Huge pages for fresh CPU outputs: the advice reaches the kernel (the mapping's VmFlags in
/proc/self/smaps say so), it is asked for only where it can pay, a host without THP gets
plain pages and no error, and a payload received into advised outputs arrives bit-exact."""

from __future__ import annotations

import asyncio
import mmap
import sys
from pathlib import Path

import pytest
import torch
from helpers_runtime import assert_same_payload, connected, make_payload, make_settings

import emtransfer as et
from emtransfer import hugepages
from emtransfer.buffers import BufferRegistry

pytestmark = pytest.mark.timeout(60)
THP = hugepages.available()
NO_THP = "this kernel offers no transparent huge pages (not Linux, or THP is off); the "
NO_THP += "no-THP path is covered by test_no_thp_means_plain_pages"


def _vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``addr``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


def _first_huge(t: torch.Tensor) -> int:
    return (t.data_ptr() + hugepages.HUGE - 1) & ~(hugepages.HUGE - 1)


@pytest.mark.skipif(not THP, reason=NO_THP)
def test_advice_reaches_the_kernel() -> None:
    # a mapping of its own, not memory the C allocator may have advised for an earlier tensor
    mem = mmap.mmap(-1, 8 << 20)  # 8 MiB: three or four whole huge pages
    t = torch.frombuffer(mem, dtype=torch.uint8)
    start = _first_huge(t)
    end = (t.data_ptr() + t.numel()) & ~(hugepages.HUGE - 1)
    assert "hg" not in _vm_flags(start)
    got = hugepages.advise(t)
    assert got == end - start >= 3 * hugepages.HUGE
    assert "hg" in _vm_flags(start)  # MADV_HUGEPAGE is set on that range
    assert "hg" in _vm_flags(end - 1)
    del t
    mem.close()


def test_too_small_or_not_on_the_cpu_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(hugepages, "_madvise", lambda: lambda *a: calls.append(a) or 0)
    assert hugepages.advise(torch.empty(hugepages.MIN_BYTES - 1, dtype=torch.uint8)) == 0
    assert hugepages.advise(torch.empty(64 << 20, dtype=torch.uint8, device="meta")) == 0
    assert calls == []
    big = torch.empty(hugepages.MIN_BYTES, dtype=torch.uint8)
    got = hugepages.advise(big)
    assert len(calls) == 1 and got == calls[0][1] > 0
    start, length, advice = calls[0]
    assert advice == hugepages.MADV_HUGEPAGE and start % hugepages.HUGE == 0
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.numel()


def test_a_refused_advice_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "_madvise", lambda: lambda *a: -1)  # EINVAL, say
    assert hugepages.advise(torch.empty(8 << 20, dtype=torch.uint8)) == 0


def test_no_thp_means_plain_pages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP_MODE", str(mode))
    hugepages._madvise.cache_clear()
    try:
        assert hugepages._madvise() is None
        assert hugepages.advise(torch.empty(8 << 20, dtype=torch.uint8)) == 0
        monkeypatch.setattr(hugepages, "_THP_MODE", str(tmp_path / "absent"))
        hugepages._madvise.cache_clear()
        assert hugepages._madvise() is None  # a kernel without THP: no such file
        mode.write_text("always [madvise] never\n")
        monkeypatch.setattr(hugepages, "_THP_MODE", str(mode))
        hugepages._madvise.cache_clear()
        if sys.platform.startswith("linux"):  # THP asked for: libc's madvise is used
            assert hugepages._madvise() is not None
    finally:
        monkeypatch.undo()
        hugepages._madvise.cache_clear()


@pytest.mark.parametrize("on", [True, False])
def test_registry_advises_fresh_outputs_when_asked(
    monkeypatch: pytest.MonkeyPatch, on: bool
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(hugepages, "advise", lambda t: seen.append(t.data_ptr()) or 0)
    reg = BufferRegistry(
        {"embeddings": ((1024,), torch.bfloat16), "pos": ((3,), torch.int64)},
        num_blocks=2,
        block_size=16,
        output_hugepages=on,
    )
    out = reg.empty_like_payload(4096)  # 8 MiB of embeddings, 96 KiB of positions
    assert seen == ([t.data_ptr() for t in out.values()] if on else [])
    seen.clear()
    reg.empty_like_payload(4096, device="meta")  # not CPU memory: nothing to advise
    assert seen == []


def test_settings_switch_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert et.Settings().output_hugepages is True
    assert BufferRegistry.from_settings(et.Settings()).output_hugepages is True
    monkeypatch.setenv("EMTRANSFER_OUTPUT_HUGEPAGES", "0")
    s = et.Settings()
    assert s.output_hugepages is False
    assert BufferRegistry.from_settings(s).output_hugepages is False


@pytest.mark.skipif(not THP, reason=NO_THP)
async def test_received_into_advised_outputs_bit_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16 MiB payload that resumes over two rounds lands in one advised output, whole."""
    advised: dict[int, int] = {}  # data_ptr -> bytes the real advice covered
    real = hugepages.advise
    monkeypatch.setattr(hugepages, "advise", lambda t: advised.setdefault(t.data_ptr(), real(t)))
    hidden = 4096
    s = make_settings(  # round 0 holds 1024 tokens: the rest resumes
        hidden_size=hidden, dtype="bfloat16", fields={}, block_size=64, default_blocks=16
    )
    n = 2048
    payload = make_payload(n, hidden=hidden, dtype=torch.bfloat16, seed=4)
    payload.pop("mrope_positions")
    async with connected(s) as (enc, lang, peer):
        assert lang.registry.output_hugepages
        send = asyncio.create_task(enc.send("big", payload))
        got = await lang.receive("big", peer)
        await send
    assert got.rounds == 2
    assert_same_payload(got.tensors, payload)
    emb = got.tensors["embeddings"]
    assert advised.get(emb.data_ptr(), 0) >= 7 * hugepages.HUGE  # of its 16 MiB, before the copy
    assert "hg" in _vm_flags(_first_huge(emb))
