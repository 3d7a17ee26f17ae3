"""The README's headline table (issue 6): one table and plots from cells of several quality runs.

Two tables, each from sources run with one set of settings (SmolLM2-135M; calibration: wiki calib
split, seed 0; evaluation: wiki and pydoc eval splits, 64 x 512, float32):
- results/quality_headline.*: the protocol's calibration, 64 x 512 (PROTOCOL.md), the README's table;
- results/quality_headline_calib16.*: 16 x 512 calibration, the earlier table (more variants, run
  when a cell took a quarter of the CPU time).
This script refuses a source with other settings, copies the chosen cells (renamed) into the
headline JSON and renders it with `structprune report` (Markdown table + PNG plots). No pruning
happens here.

    python benchmarks/headline.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# (source run, method name in the source, name in the headline table)
CELLS_CALIB64 = [
    ("quality_p64_base.json", "random", "random (FFN only)"),
    ("quality_p64_base.json", "wanda-sp", "wanda-sp (FFN only)"),
    ("quality_p64_flap.json", "flap", "flap"),
    ("quality_p64_global.json", "global", "global (whole-model Taylor, O(N))"),
    ("quality_p64_global.json", "global-ffn", "global, FFN only"),
    ("quality_p64_default.json", "structprune", "structprune default (uniform, rho auto: FFN only)"),
    ("quality_p64_best.json", "structprune-softmax-rel-ffn", "structprune softmax relative, FFN only"),
    ("quality_p64_robust.json", "structprune-softmax-robust-ffn", "structprune softmax robust, FFN only"),
    ("quality_p64_robust_damp.json", "structprune-softmax-robust-ffn-damp0.1",
     "structprune softmax robust, FFN only, damp 0.1"),
    ("quality_p64_residual.json", "structprune-robust-res0.5",
     "structprune softmax robust, FFN only, residual target (mix 0.5)"),
    ("quality_p64_sensitivity.json", "structprune-sens4-ffn", "structprune sensitivity allocation, FFN only"),
    ("quality_p64_sensitivity.json", "structprune-sens4-res0.5",
     "structprune sensitivity allocation, FFN only, residual target (mix 0.5)"),
]
CELLS_CALIB16 = [
    ("quality_best.json", "random", "random (FFN only)"),
    ("quality_best.json", "wanda-sp", "wanda-sp (FFN only)"),
    ("quality_flap.json", "flap", "flap"),
    ("quality_best.json", "global", "global (whole-model Taylor, O(N))"),
    ("quality_best.json", "global-ffn", "global, FFN only"),
    ("quality_default.json", "structprune-default", "structprune default (uniform, rho auto: FFN only)"),
    ("quality_admm.json", "structprune-admm2", "structprune default masks + ADMM (2 iterations)"),
    ("quality_alloc_rel_0.2.json", "structprune-softmax-rel-ffn", "structprune softmax relative, FFN only"),
    ("quality_alloc_rel_0.3.json", "structprune-softmax-rel-ffn", "structprune softmax relative, FFN only"),
    ("quality_alloc_rel_0.5.json", "structprune-softmax-rel-ffn", "structprune softmax relative, FFN only"),
    ("quality_best.json", "structprune-rel-obs", "structprune softmax relative + OBS selection, FFN only"),
    ("quality_sensitivity16.json", "structprune-sens3-ffn",
     "structprune sensitivity allocation (3 fractions per module), FFN only"),
    ("quality_best.json", "structprune-rel-lora100", "structprune softmax relative, FFN only + LoRA 100 steps (fine-tuned)"),
]
TABLES = {  # output name: (cells, calibration windows)
    "quality_headline.json": (CELLS_CALIB64, 64),
    "quality_headline_calib16.json": (CELLS_CALIB16, 16),
}


def build(cells: list[tuple[str, str, str]], nsamples: int) -> dict:
    from structprune.bench import settings_from_protocol

    expected = {"model": "smollm2-135m", "nsamples": nsamples, "seqlen": 512, "windows": 64, "calib": "wiki"}
    out: dict = {"cells": {}, "sources": {}}
    for source, method, name in cells:
        path = RESULTS / source
        if not path.exists():
            print(f"skipped {source}: not there", file=sys.stderr)
            continue
        run = json.loads(path.read_text())
        recorded = run.get("settings") or settings_from_protocol(run.get("protocol")) or {}
        settings = {k: recorded.get(k) for k in expected}
        if settings != expected:
            raise ValueError(f"{source} was run with {settings}, not {expected}")
        for key, cell in run["cells"].items():
            if cell["method"] == method:
                out["cells"][f"{name}@{cell['requested']}"] = {**cell, "method": name}
                out["sources"][f"{name}@{cell['requested']}"] = f"{source}: {key}"
        for field in ("settings", "protocol", "dense"):
            out.setdefault(field, run.get(field))
    return out


def main() -> None:
    from structprune.bench import render, write_atomic
    from structprune.bench.report import report

    for name, (cells, nsamples) in TABLES.items():
        headline = build(cells, nsamples)
        path = RESULTS / name
        write_atomic(path, headline)
        print(render(headline))
        for written in report(str(path)):
            print(written)


if __name__ == "__main__":
    main()
