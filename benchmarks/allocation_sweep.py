"""Allocation report (issue 3): per-rule tables and the temperature sweep, from saved cells.

Reads the quality cells written by benchmarks/quality.py (no pruning here):
  - results/quality_alloc.json: structprune-<rule>-ffn@S (FFN only, calibration 16 x 512, eval 64 x 512);
    the uniform reference with the same scores and re-fit is structprune-default@S in
    results/quality_default.json (rho auto chose 0, FFN only, at every level);
  - results/quality_sweep.json: the temperature sweep at 30%, heads + FFN, on a reduced protocol
    (calibration 8 x 512, eval 32 x 512, for CPU time): structprune-softmax-T<f>x@0.3 and
    structprune-modular-T<f>x@0.3 (T = f x the score scale), -Tauto (searched T) and
    structprune-uniform@0.3 (T = inf, equal ratios) measured the same way.
Prints Markdown tables and writes results/allocation_sweep.json and allocation_sweep.png.

    python benchmarks/allocation_sweep.py
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LEVELS = (0.2, 0.3, 0.5)


def _cells(*names: str) -> dict:
    out: dict = {}
    for n in names:
        path = RESULTS / f"{n}.json"
        if path.exists():
            out.update(json.loads(path.read_text())["cells"])
    return out


def rule_table(cells: dict) -> tuple[str, list[dict]]:
    """FFN-only rules against uniform (same Wanda scores, same least-squares re-fit)."""
    rows = []
    refs = {"uniform": "structprune-default", "softmax (Alg. 1, T auto)": "structprune-softmax-ffn",
            "closed form (Alg. 4)": "structprune-closed-form-ffn"}
    for label, method in refs.items():
        row = {"rule": label}
        for s in LEVELS:
            c = cells.get(f"{method}@{s}")
            row[s] = None if c is None else {"perplexity": c["perplexity"], "actual": c["actual"],
                                             "temperature": c["allocation"].get("temperature")}
        rows.append(row)
    lines = ["| allocation (FFN only, Wanda scores, lstsq re-fit) | " + " | ".join(f"{s:.0%}" for s in LEVELS) + " |",
             "|---|" + "---|" * len(LEVELS)]
    for row in rows:
        lines.append(f"| {row['rule']} | " + " | ".join(
            "-" if row[s] is None else f"{row[s]['perplexity']:.2f} ({row[s]['actual']:.3f})" for s in LEVELS) + " |")
    return "\n".join(lines), rows


def sweep(cells: dict) -> dict[str, list[dict]]:
    """Per algorithm: [{factor, temperature, perplexity}] for the fixed-T cells and the auto cell."""
    out: dict[str, list[dict]] = {"softmax": [], "modular": []}
    for key, c in cells.items():
        m = re.fullmatch(r"structprune-(softmax|modular)-T(auto|[0-9.]+x)@0\.3", key)
        if not m:
            continue
        info = c["allocation"]
        t, scale = info.get("temperature"), info.get("score_scale")
        factor = None if t is None or scale is None else (math.inf if t == math.inf else t / scale)
        out[m.group(1)].append({"factor": factor, "temperature": t, "perplexity": c["perplexity"],
                                "actual": c["actual"], "auto": m.group(2) == "auto",
                                "proxy_search": info.get("search")})
    for rows in out.values():
        rows.sort(key=lambda r: (r["auto"], r["factor"] if r["factor"] is not None else 0))
    return out


def sweep_table(rows: dict[str, list[dict]], uniform: float | None) -> str:
    factors = sorted({r["factor"] for v in rows.values() for r in v if not r["auto"] and r["factor"] is not None})
    head = ["T / score scale"] + [f"{f:g}" for f in factors] + ["auto (T / scale)", "uniform (T = inf)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    names = {"softmax": "Algorithm 1 (softmax, all modules)", "modular": "Algorithm 2 (softmax-modular, rho 1)"}
    for alg, label in names.items():
        by = {r["factor"]: r for r in rows[alg] if not r["auto"]}
        auto = next((r for r in rows[alg] if r["auto"]), None)
        cells = [f"{by[f]['perplexity']:.2f}" if f in by else "-" for f in factors]
        cells.append("-" if auto is None else f"{auto['perplexity']:.2f} ({auto['factor']:.3g})")
        cells.append("-" if uniform is None else f"{uniform:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], uniform: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    styles = {"softmax": ("o-", "C0", "Algorithm 1 (softmax)"), "modular": ("s-", "C1", "Algorithm 2 (modular)")}
    for alg, (fmt, color, label) in styles.items():
        fixed = [r for r in rows[alg] if not r["auto"] and r["factor"] is not None and math.isfinite(r["factor"])]
        if fixed:
            ax.plot([r["factor"] for r in fixed], [r["perplexity"] for r in fixed], fmt, color=color, label=label)
        for r in rows[alg]:
            if r["auto"] and r["factor"] is not None and math.isfinite(r["factor"]):
                ax.plot([r["factor"]], [r["perplexity"]], "*", color=color, markersize=16,
                        markeredgecolor="k", label=f"{label.split(' (')[0]}: auto T")
    if uniform is not None:
        ax.axhline(uniform, color="gray", ls="--", label="uniform (T = inf)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("temperature T / score scale")
    ax.set_ylabel("perplexity (wiki eval, 32 x 512)")
    ax.set_title("SmolLM2-135M, 30% actual sparsity, heads + FFN, lstsq re-fit, calibration 8 x 512", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    cells = _cells("quality_default", "quality_alloc")
    table, rule_rows = rule_table(cells)
    swept = _cells("quality_sweep")
    rows = sweep(swept)
    uni = swept.get("structprune-uniform@0.3")
    uniform = None if uni is None else uni["perplexity"]
    print(table)
    print()
    print(sweep_table(rows, uniform))
    (RESULTS / "allocation_sweep.json").write_text(json.dumps(
        {"rules": rule_rows,
         "sweep": rows, "uniform_heads_ffn_0.3": uniform,
         "protocol": {"rules": "calibration 16 x 512, eval 64 x 512", "sweep": "calibration 8 x 512, eval 32 x 512"}}, indent=1, default=str))
    plot(rows, uniform, RESULTS / "allocation_sweep.png")
    print(f"\nwrote {RESULTS / 'allocation_sweep.json'} and {RESULTS / 'allocation_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
