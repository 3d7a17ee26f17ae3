"""Quality benchmark (PROTOCOL.md): methods x actual sparsity on the default model.

A thin wrapper over `structprune bench quality` (structprune/bench/quality.py), same options; results
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

from structprune.cli import main as cli_main

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    """`structprune bench quality ARGV`, its results under benchmarks/results/ unless --out is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    known, _ = p.parse_known_args(argv)
    if known.out is None:
        argv += ["--out", str(RESULTS / ("quality_quick.json" if known.quick else "quality.json"))]
    logging.basicConfig(level=logging.WARNING)  # before the CLI's own (INFO): this script stays quiet
    torch.manual_seed(0)
    return cli_main(["bench", "quality", *argv])


if __name__ == "__main__":
    sys.exit(main())
