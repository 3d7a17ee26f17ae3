"""The CLI's host-memory setting: freed tensors of 1 MiB and more go back to the OS (glibc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from structprune import hostmem

# Runs in a fresh interpreter: the resident set is process-wide, so threads and finalisers left
# behind by earlier tests (a llama.cpp model, lm-eval's workers) must not move it during the measurement.
_BODY = """
import json, torch
from structprune import hostmem

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

ok = hostmem.release_freed_memory()
spike = torch.ones(30 << 18)  # 30 MiB, freed: would raise glibc's dynamic mmap threshold
del spike
before = rss_kib()
blocks, live = [], []
for _ in range(64):
    blocks.append(torch.ones(1 << 20))  # 4 MiB, touched
    live.append(torch.ones(1 << 12))  # 16 KiB that stays, between them
grown = rss_kib()
del blocks
print(json.dumps({"ok": ok, "before": before, "grown": grown, "after": rss_kib()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or hostmem._libc() is None, reason="glibc only")
def test_freed_tensors_leave_the_resident_set():
    """Without the fixed threshold, freeing a 30 MiB block raises glibc's mmap threshold, the 4 MiB
    blocks then come from the heap between small live objects, and freeing them leaves them resident."""
    run = subprocess.run([sys.executable, "-c", _BODY], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", **os.environ})
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["ok"]
    assert m["grown"] - m["before"] > 200 * 1024
    assert m["after"] - m["before"] < 64 * 1024  # at most a quarter of the 256 MiB stays resident
