"""Ctrl-C (SIGINT) and SIGTERM during a command: a clean exit instead of a traceback or a kill.

While a command runs, both signals raise `Interrupted` (a KeyboardInterrupt) in the main
thread, so every `finally` and `except BaseException` on the way out runs: a layer-wise prune
keeps its finished layers in the working folder beside --out (`io.partial_dir`) and --out
itself is never half-written (it appears by one rename at the very end). The CLI then exits
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell would.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by the handler of SIGINT or SIGTERM; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_OWNER = {"pid": -1}  # the process that installed the handlers


def _raise(signum: int, frame: Any) -> None:
    if os.getpid() != _OWNER["pid"]:  # a forked worker (multiprocessing pools of lm-eval, datasets):
        signal.signal(signum, signal.SIG_DFL)  # it inherited the handler; let the signal end it quietly
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def install() -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise `Interrupted`; returns the function that restores the old
    handlers. Outside the main thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _OWNER["pid"] = os.getpid()
    old = {s: signal.signal(s, _raise) for s in SIGNALS}

    def restore() -> None:
        for s, handler in old.items():
            signal.signal(s, handler)

    return restore


def exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for SIGINT (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def message(exc: BaseException, command: str, out: str | None) -> str:
    """What an interrupted command leaves behind, and how to continue."""
    from .io import PROGRESS_NAME, partial_dir

    name = signal.Signals(exit_code(exc) - 128).name
    if command in ("prune", "demo") and out:
        part = partial_dir(out)
        if (part / PROGRESS_NAME).is_file():
            return (f"interrupted by {name}: --out {out} was not written; the finished layers are kept in {part}: "
                    "run the same command with --resume to continue (or --overwrite to start over)")
        return f"interrupted by {name} before any layer was finished; nothing was written"
    return f"interrupted by {name}"
