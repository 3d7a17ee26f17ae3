"""Run `structprune <args>` in this process, then print its peak memory for benchmarks/memory.py.

Prints, after the CLI's own output:
    host_peak_rss_bytes=N   the process's peak resident set (getrusage ru_maxrss)
    cuda_peak_bytes=N       torch.cuda.max_memory_allocated(), when CUDA was used and
                            STRUCTPRUNE_REPORT_CUDA_PEAK=1
"""

from __future__ import annotations

import os
import resource
import sys


def report_peaks() -> None:
    print(f"host_peak_rss_bytes={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
    torch = sys.modules.get("torch")
    if os.environ.get("STRUCTPRUNE_REPORT_CUDA_PEAK") == "1" and torch is not None and torch.cuda.is_initialized():
        print(f"cuda_peak_bytes={torch.cuda.max_memory_allocated()}", flush=True)


def main() -> int:
    from structprune.cli import main as cli_main

    code = cli_main(sys.argv[1:])
    sys.stdout.flush()
    report_peaks()
    return code


if __name__ == "__main__":
    sys.exit(main())
