"""The CLI's signal handlers belong to the CLI's own process, not to workers forked from it."""

from __future__ import annotations

import subprocess
import sys

_POOL = """
import multiprocessing as mp, time
from structprune import interrupts
restore = interrupts.install()
def work(x):
    time.sleep(0.2)
    return x * 2
for _ in range(5):
    with mp.get_context("fork").Pool(2) as pool:  # leaving the block SIGTERMs the workers
        out = pool.map(work, range(4))
        time.sleep(0.3)  # the workers are idle, waiting on the task queue
print(out)
restore()
print("done")
"""


def test_forked_pool_workers_end_quietly_on_sigterm():
    """lm-eval and datasets fork multiprocessing pools and end them with SIGTERM: the inherited
    handler must let those workers die instead of raising `Interrupted` with a traceback."""
    run = subprocess.run([sys.executable, "-c", _POOL], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[0,", "2,", "4,", "6]", "done"]
    assert "Traceback" not in run.stderr and "Interrupted" not in run.stderr, run.stderr
