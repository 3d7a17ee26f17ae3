"""Quality benchmark (PROTOCOL.md): methods x actual sparsity on the default model.

A thin wrapper over `structprune bench quality` (structprune/bench.py), same options; results
go to benchmarks/results/quality.json unless --out is given (resumable: finished cells are
kept and skipped). Render a saved run with `structprune report benchmarks/results`.

    python benchmarks/quality.py --methods flap --out benchmarks/results/quality_flap.json
    python benchmarks/quality.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from structprune.cli_commands import cmd_bench_quality
from structprune.cli_options import add_quality_options

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quality_options(p, out=str(RESULTS / "quality.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    try:
        return cmd_bench_quality(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
