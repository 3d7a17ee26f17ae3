"""The CLI's signal handlers belong to the CLI's own process, not to workers forked from it."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import multiprocessing as mp, signal, time
from structprune import interrupts
restore = interrupts.install()
ready = mp.get_context("fork").Event()
def work():
    ready.set()
    time.sleep(60)
p = mp.get_context("fork").Process(target=work)
p.start()
ready.wait(30)
p.terminate()  # SIGTERM, as a multiprocessing pool ends its workers
p.join(30)
restore()
print(p.exitcode)
"""


def test_forked_worker_ends_quietly_on_sigterm():
    """lm-eval and datasets fork worker processes and end them with SIGTERM: the inherited handler
    must let such a worker die by the signal instead of raising `Interrupted` with a traceback."""
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["-15"], (run.stdout, run.stderr)  # killed by SIGTERM, as without a handler
    assert "Traceback" not in run.stderr and "Interrupted" not in run.stderr, run.stderr
