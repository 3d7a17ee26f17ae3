"""`structprune report DIR_OR_JSON`: render saved quality runs (bench/quality.py JSON) as Markdown and PNGs.

Reads the saved JSON only (and, for files written before per-layer shapes were recorded,
the dense shape from the cell's saved plan beside it). Writes, beside each JSON file:
<stem>.md (the tables), <stem>_perplexity.png (perplexity against actual sparsity per method,
log y, one panel per text) and <stem>_layers.png (per-layer kept fraction of the decoder
layer's linear weights, for every STRUPRUNE variant cell).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..plan import PrunePlan
from .results import cell_perplexity, dense_perplexity, evaluated_texts, load_results, render

# Methods whose per-layer allocation is worth a plot: every STRUPRUNE variant, and the
# baselines that choose per-layer shapes themselves (FLAP's and the global Taylor ranking).
LAYER_PLOT_PREFIXES = ("structprune", "flap", "global")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_png(results: dict[str, Any], path: Path, title: str = "") -> None:
    """Perplexity against actual sparsity per method (log y), one panel per text; dense as a line."""
    plt = _plt()
    texts = evaluated_texts(results)
    cells = results["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4), dpi=110, squeeze=False)
    for ax, text in zip(axes[0], texts):
        for idx, m in enumerate(methods):  # one colour and marker per method in every panel
            pts = sorted((c["actual"], cell_perplexity(c, text)) for c in cells.values()
                         if c["method"] == m and cell_perplexity(c, text) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "os^vD"[idx // 10 % 5] + "-", color=f"C{idx % 10}",
                        label=m)
        d = dense_perplexity(results, text)
        if d is not None:
            ax.axhline(d, color="grey", ls=":", label=f"dense {d:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("actual decoder sparsity")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{text} eval" + (f": {title}" if title else ""), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _dense_shape(results: dict[str, Any], key: str, folder: Path) -> dict[str, int] | None:
    shape = results.get("dense", {}).get("shape")
    if shape is not None:
        return shape
    plan = folder / "plans" / f"{key}.json.gz"
    if plan.is_file():
        layers = PrunePlan.load(plan).layers
        if layers:
            return layers[0].dense_shape
    return None


def layer_fractions(cell: dict[str, Any], shape: dict[str, int]) -> tuple[list[float], list[float]]:
    """Per layer: (kept fraction of the attention weights, kept fraction of the MLP neurons).

    A query head and a KV head carry equal weight counts in every supported family (2 x hidden
    x head_dim), so attention's kept fraction is (query + KV heads kept) / (dense query + KV
    heads). Cells without recorded KV counts: KV heads taken in proportion to query heads."""
    kept = cell["kept"]
    heads, neurons = kept["heads"], kept["neurons"]
    kv = kept.get("kv_heads") or [h * shape["num_kv_heads"] / shape["num_heads"] for h in heads]
    dense_attn = shape["num_heads"] + shape["num_kv_heads"]
    attn = [(h + k) / dense_attn for h, k in zip(heads, kv)]
    mlp = [n / shape["intermediate_size"] for n in neurons]
    return attn, mlp


def layers_png(results: dict[str, Any], path: Path, folder: Path) -> bool:
    """Per-layer kept fraction of attention and MLP for each STRUPRUNE variant (and adaptive
    baseline) cell, one row of panels per requested sparsity; False if there is none."""
    cells = {k: c for k, c in results["cells"].items() if c["method"].startswith(LAYER_PLOT_PREFIXES)}
    if not cells:
        return False
    levels = sorted({c["requested"] for c in cells.values()})
    plt = _plt()
    fig, axes = plt.subplots(len(levels), 2, figsize=(14, 3.3 * len(levels)), dpi=100, sharey=True, squeeze=False)
    for key, cell in sorted(cells.items(), key=lambda kv: (kv[1]["method"], kv[1]["requested"])):
        shape = _dense_shape(results, key, folder)
        if shape is None:
            continue
        attn, mlp = layer_fractions(cell, shape)
        row = axes[levels.index(cell["requested"])]
        row[0].plot(range(len(attn)), attn, ".-")
        row[1].plot(range(len(mlp)), mlp, ".-", label=f"{cell['method']} (actual {cell['actual']:.3f})")
    for level, row in zip(levels, axes):
        for ax, what in zip(row, ("attention (query + KV heads)", "MLP neurons")):
            ax.set_title(f"sparsity {level:.0%}: kept fraction of {what}", fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("kept fraction")
        row[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for ax in axes[-1]:
        ax.set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def report(target: str | Path) -> list[Path]:
    """Render every run JSON at `target` (a file, or the *.json files directly in a folder).
    Returns the files written."""
    target = Path(target)
    if target.is_dir():
        files = sorted(p for p in target.glob("*.json") if _is_run(p))
        if not files:
            raise FileNotFoundError(f"no quality-run JSON files in {target}")
    elif target.is_file():
        files = [target]
    else:
        raise FileNotFoundError(f"{target} does not exist; pass a run JSON file or the folder holding them")
    written: list[Path] = []
    for f in files:
        results = load_results(f)
        if not results["cells"]:
            continue
        md = f.with_suffix(".md")
        md.write_text(f"# {f.stem}\n\n" + render(results) + "\n")
        written.append(md)
        png = f.with_name(f.stem + "_perplexity.png")
        perplexity_png(results, png, title=f.stem)
        written.append(png)
        layers = f.with_name(f.stem + "_layers.png")
        if layers_png(results, layers, f.parent):
            written.append(layers)
    return written


def _is_run(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("cells"), dict)
