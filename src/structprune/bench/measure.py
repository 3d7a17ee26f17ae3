"""Memory and time of a pruning call: process RSS (Linux /proc), module sizes, the dense
forward pass every cell's pruning time is divided by."""

from __future__ import annotations

import time

import torch


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux clear_refs 5); False where not possible, in which
    case the peak is the process lifetime's (a bound, stated in the result)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last reset, in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def dense_forward_seconds(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Time of one dense forward pass of the calibration set through the decoder (the reference)."""
    from ..arch import get_adapter
    from ..runtime.hooks import calibration_mode

    base = get_adapter(model.config).timed_body(model)
    t0 = time.perf_counter()
    with calibration_mode(model):
        for start in range(0, windows.shape[0], batch_size):
            base(input_ids=windows[start : start + batch_size], use_cache=False)
    return time.perf_counter() - t0
