"""Transparent huge pages for fresh CPU outputs.

A payload received into a fresh CPU tensor is written once, right away, page by page. With 4 KiB
pages the first touch of a 16 MiB output costs 4,096 page faults, which on a VM takes longer
than the copy itself whenever the C allocator hands out a new mapping (it does for large
tensors whenever its cache of freed memory does not cover them). ``MADV_HUGEPAGE`` on the
tensor's whole 2 MiB pages before that first touch lets the kernel back them with huge pages:
one fault per 2 MiB. Linux only; elsewhere, or with THP off (``never``), this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import torch

_THP = "/sys/kernel/mm/transparent_hugepage/"
_THP_MODE = _THP + "enabled"
MADV_HUGEPAGE = 14  # linux/mman-common.h


def _pmd_size() -> int:
    """Bytes of one transparent huge page: 2 MiB on x86-64 and on arm64 with 4 KiB pages."""
    try:
        with open(_THP + "hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _pmd_size()
#: smallest tensor advised: below two huge pages the gain is at most one page's faults
MIN_BYTES = 2 * HUGE


@cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's madvise when THP can be asked for here, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(_THP_MODE) as f:
            mode = f.read()
    except OSError:  # a kernel built without THP
        return None
    if "[never]" in mode:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether huge pages can be asked for on this host (Linux, THP not ``never``)."""
    return _madvise() is not None


def advise(tensor: torch.Tensor) -> int:
    """Ask for huge pages over the whole huge pages (:data:`HUGE`) inside ``tensor``'s bytes
    (a CPU tensor not yet touched, for the advice to pay). Returns the bytes advised: 0 when
    the tensor is not on the CPU, smaller than :data:`MIN_BYTES`, or the advice is unavailable
    or refused (a refusal is harmless: the pages stay small)."""
    if tensor.device.type != "cpu":
        return 0
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < MIN_BYTES:
        return 0
    fn = _madvise()
    if fn is None:
        return 0
    ptr = tensor.data_ptr()
    start = (ptr + HUGE - 1) & ~(HUGE - 1)
    end = (ptr + nbytes) & ~(HUGE - 1)
    if end <= start or fn(start, end - start, MADV_HUGEPAGE) != 0:
        return 0
    return end - start
