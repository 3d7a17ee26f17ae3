"""Choose the default allocation on VALIDATION data (issue 18; PROTOCOL.md "Calibration and validation").

Runs candidate configurations of `structprune prune` through the quality harness, scored only on the
calibration text's validation windows (`--texts validation`: 8 x seqlen windows of the calibration split
that share no token with any calibration or held-back window), and prints the table a default is chosen
from: validation perplexity and pruning time over one dense forward pass, per candidate and sparsity.
The eval splits are never read here; they only report the chosen default (benchmarks/quality.py).

    python benchmarks/choose_default.py --model smollm2-135m --nsamples 16 --sparsities 0.3
    python benchmarks/choose_default.py --model gemma3-270m --nsamples 16 --sparsities 0.3

Writes benchmarks/results/validation/<model>/n<nsamples>.json (the harness's run file: every cell, its
plan under plans/ beside it) and prints the table; rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from structprune.cli import main as cli_main

RESULTS = Path(__file__).parent / "results" / "validation"
# tag -> PruneConfig options (flat names, as `structprune prune` flags / `--set FIELD=VALUE`)
CANDIDATES = {
    "uniform": ["allocation=uniform"],  # the default before issue 18: uniform over depth, rho searched
    # sensitivity linear, heads and neurons: each module measured up to 1.5x / 2x the sparsity
    "senslin": ["allocation=sensitivity", "sensitivity=linear", "sensitivity_max_step=1.5"],
    "senslin-s2": ["allocation=sensitivity", "sensitivity=linear", "sensitivity_max_step=2.0"],
    "senslin-mlp15": ["allocation=sensitivity", "sensitivity=linear", "prune_attention=false",
                      "sensitivity_max_step=1.5"],
}
# Cells measured with the first linear estimator (each candidate layer run on the held-back
# windows, all calibration windows re-fitting the candidates, up to 2x the sparsity): kept in the
# JSON files and printed when present, no longer re-run.
EARLIER = ["senslin-both", "senslin-mlp", "senslin-mlp-res"]


def _run(args: argparse.Namespace, out: Path, tag: str, options: list[str]) -> int:
    argv = ["bench", "quality", "--model", args.model, "--methods", "structprune", "--sparsities",
            *map(str, args.sparsities), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--texts", "validation", f"--tag=-{tag}", "--out", str(out), "--device", args.device]
    return cli_main(argv + (["--set", *options] if options else []))


def table(results: dict, sparsities: list[float]) -> list[str]:
    """Markdown rows: candidate x sparsity -> validation perplexity (pruning time / dense forward)."""
    dense = results["dense"]["perplexity_by_text"]["validation"]
    rows = [f"dense validation perplexity {dense:.3f}", "",
            "| candidate | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
            "|---|" + "---|" * len(sparsities)]
    for tag in [*CANDIDATES, *(f"{t} (earlier)" for t in EARLIER)]:
        cells = []
        for s in sparsities:
            cell = results["cells"].get(f"structprune-{tag.removesuffix(' (earlier)')}@{s}")
            cells.append("-" if cell is None else
                         f"{cell['perplexity_by_text']['validation']:.3f} ({cell['time_ratio']:.1f}x)")
        rows.append(f"| {tag} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    folder = RESULTS / args.model.replace("/", "_")  # one folder per model: plans/ is named by cell only
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"n{args.nsamples}.json"
    for tag in args.candidates:
        rc = _run(args, out, tag, CANDIDATES[tag])
        if rc:
            return rc
    print("\n".join(table(json.loads(out.read_text()), args.sparsities)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
