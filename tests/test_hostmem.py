"""The CLI's host-memory setting: freed tensors of 1 MiB and more go back to the OS (glibc)."""

from __future__ import annotations

import sys

import pytest
import torch

from structprune import hostmem


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or hostmem._libc() is None, reason="glibc only")
def test_freed_tensors_leave_the_resident_set():
    """Without the fixed threshold, freeing a 30 MiB block raises glibc's mmap threshold, the 4 MiB
    blocks then come from the heap between small live objects, and freeing them leaves them resident."""
    assert hostmem.release_freed_memory()
    spike = torch.ones(30 << 18)  # 30 MiB, freed: would raise a dynamic threshold
    del spike
    before = _rss_kib()
    blocks, live = [], []
    for _ in range(64):
        blocks.append(torch.ones(1 << 20))  # 4 MiB, touched
        live.append(torch.ones(1 << 12))  # 16 KiB that stays, between them
    grown = _rss_kib()
    del blocks
    after = _rss_kib()
    assert grown - before > 200 * 1024
    assert after - before < 64 * 1024  # at most a quarter of the 256 MiB stays resident
