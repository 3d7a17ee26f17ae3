"""Inference speed of a pruned model against its dense original: `structprune bench speed` (speed.py).

    python benchmarks/speed.py out/smollm2-135m-0.3 --batch 1 8   # = structprune bench speed ...

See `structprune bench speed --help` and src/structprune/speed.py for what is measured.
"""

from __future__ import annotations

import sys

from structprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", *sys.argv[1:]]))
