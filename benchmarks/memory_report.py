"""benchmarks/memory.py's pure part: slopes of peak memory against parameters, the Markdown
table and the log-log plot (rows in, text or PNG out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METHODS = ("structprune", "global")
MIB = 1 << 20


def fit_slope(params: list[float], peaks: list[float | None]) -> float | None:
    """Slope of log(peak) against log(params) by least squares; None with fewer than two points."""
    pts = [(p, m) for p, m in zip(params, peaks) if m is not None and m > 0 and p > 0]
    if len(pts) < 2 or len({p for p, _ in pts}) < 2:
        return None
    x = np.log([p for p, _ in pts])
    y = np.log([m for _, m in pts])
    return float(np.polyfit(x, y, 1)[0])


def slopes(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """{method: {"cuda": slope of peak accelerator memory, "host": slope of peak host RSS}}."""
    out: dict[str, dict[str, float | None]] = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        out[method] = {
            "cuda": fit_slope([r["params"] for r in mine], [r.get("cuda_peak_bytes") for r in mine]),
            "host": fit_slope([r["params"] for r in mine], [r.get("host_peak_rss_bytes") for r in mine]),
        }
    return out


def mib_text(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MIB:,.0f}"


def _ratio(x: float | None, ref: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not ref else f"{x / ref:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """One row per (size, method): sizes, peaks in MiB and against the model / one layer, time."""
    head = ("| size | params | model MiB | layer MiB | method | accel peak MiB | accel/model | accel/layer "
            "| host RSS MiB | RSS/model | time s | of it allocation s | time / dense fwd | actual sparsity | status |")
    lines = [head, head_rule(head)]
    for r in rows:
        cuda = r.get("cuda_peak_bytes")
        rss = r.get("host_peak_rss_bytes")
        sec = r.get("seconds")
        sp = r.get("actual_sparsity")
        alloc = r.get("allocation_seconds")
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:,.0f}M | {mib_text(r['model_bytes'])} | {mib_text(r['layer_bytes'])} "
            f"| {r['method']} | {mib_text(cuda)} | {_ratio(cuda, r['model_bytes'])} | {_ratio(cuda, r['layer_bytes'], 1)} "
            f"| {mib_text(rss)} | {_ratio(rss, r['model_bytes'])} | {'n/a' if sec is None else f'{sec:.1f}'} "
            f"| {'n/a' if alloc is None else f'{alloc:.1f}'} | {_ratio(sec, r.get('reference_seconds'), 1)} | {'n/a' if sp is None else f'{sp:.3f}'} "
            f"| {r['status']} |")
    return "\n".join(lines)


def slope_text(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.2f}"


def head_rule(head: str) -> str:
    return "|" + "---|" * (head.count("|") - 1)


def plot(rows: list[dict], fitted: dict[str, dict[str, float | None]], path: Path, title: str) -> None:
    """Log-log peak memory against parameter count, one panel per measured memory kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k, key in (("cuda", "cuda_peak_bytes"), ("host", "host_peak_rss_bytes"))
             if any(r.get(key) for r in rows)]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        key = "cuda_peak_bytes" if kind == "cuda" else "host_peak_rss_bytes"
        for method, marker in zip(METHODS, ("o", "s")):
            pts = sorted((r["params"], r[key]) for r in rows
                         if r["method"] == method and r["status"] == "ok" and r.get(key))
            if not pts:
                continue
            x, y = np.array([p for p, _ in pts], float), np.array([m for _, m in pts], float) / MIB
            s = fitted[method][kind]
            label = f"{method} (slope {s:.2f})" if s is not None else method
            line = ax.loglog(x, y, marker=marker, linestyle="none", label=label)[0]
            if s is not None:
                c = np.polyfit(np.log(x), np.log(y), 1)
                xs = np.geomspace(x.min(), x.max(), 20)
                ax.loglog(xs, np.exp(np.polyval(c, np.log(xs))), color=line.get_color(), linewidth=1)
        sizes = sorted({(r["params"], r["model_bytes"], r["layer_bytes"]) for r in rows})
        ax.loglog([p for p, _, _ in sizes], [b / MIB for _, b, _ in sizes], "k--", linewidth=0.8, label="whole model")
        ax.loglog([p for p, _, _ in sizes], [b / MIB for _, _, b in sizes], "k:", linewidth=0.8, label="one layer")
        ax.set_xlabel("parameters")
        ax.set_ylabel("MiB")
        ax.set_title("peak accelerator memory" if kind == "cuda" else "peak host RSS")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
