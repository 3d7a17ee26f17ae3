"""A quality run's JSON file: read, write atomically, render as Markdown tables.

The file is {"settings", "protocol", "dense": {...}, "cells": {key: cell}}; a cell holds its
method, requested and actual sparsity, perplexity per text, time and memory (quality.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load_results(path: Path) -> dict[str, Any]:
    """A saved run ({"cells": {...}, ...}); an empty run when the file does not exist."""
    if not path.exists():
        return {"cells": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise ValueError(f"{path} is not a quality-run JSON (no 'cells' object)")  # noqa: TRY004 (a bad file)
    return data


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON to `path` through a temporary sibling (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def evaluated_texts(results: dict[str, Any]) -> list[str]:
    """The evaluation texts of a run's cells, in first-seen order ("wiki" for old files)."""
    names: list[str] = []
    for c in results["cells"].values():
        for t in c.get("perplexity_by_text", {"wiki": None}):
            if t not in names:
                names.append(t)
    return names or ["wiki"]


def cell_perplexity(cell: dict[str, Any], text: str) -> float | None:
    """A cell's perplexity on `text`, or None if it was not evaluated on it."""
    by = cell.get("perplexity_by_text")
    if by is not None:
        return by.get(text)
    return cell.get("perplexity") if text == "wiki" else None


def dense_perplexity(results: dict[str, Any], text: str) -> float | None:
    """The dense model's perplexity on `text` (old files: "perplexity" is wiki's)."""
    dense = results.get("dense", {})
    return dense.get("perplexity_by_text", {}).get(text, dense.get("perplexity") if text == "wiki" else None)


def _grid(results: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[float]]:
    cells = results["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    levels = sorted({c["requested"] for c in cells.values()})
    return cells, methods, levels


def _find(cells: dict[str, Any], method: str, level: float) -> dict[str, Any] | None:
    return next((c for c in cells.values() if c["method"] == method and c["requested"] == level), None)


def _header(levels: list[float]) -> list[str]:
    return ["| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |", "|---|" + "---|" * len(levels)]


def _perplexity_table(results: dict[str, Any], text: str) -> list[str]:
    cells, methods, levels = _grid(results)
    protocol = results.get("protocol", {})
    d = dense_perplexity(results, text)
    what = protocol.get("eval_texts", {}).get(text, protocol.get("eval", "") if text == "wiki" else text)
    lines = [f"Perplexity on {text} ({what}); dense {d:.2f}" if d is not None else f"Perplexity on {text}", "",
             *_header(levels)]
    for m in methods:
        row = []
        for s in levels:
            c = _find(cells, m, s)
            v = None if c is None else cell_perplexity(c, text)
            row.append("-" if v is None else f"{v:.2f} (actual {c['actual']:.3f})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _cost_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    mem = c.get("memory", {})
    extra = f", {mem['peak_rss_bytes'] / 2**20:.0f} MiB" if "peak_rss_bytes" in mem else ""
    if "cuda_peak_bytes" in mem:
        extra += f", CUDA {mem['cuda_peak_bytes'] / 2**20:.0f} MiB"
    return f"{c['time_ratio']:.1f}x ({c['prune_seconds']:.0f} s{extra})"


def _cost_table(results: dict[str, Any]) -> list[str]:
    cells, methods, levels = _grid(results)
    lines = ["Pruning time (x one dense calibration forward; seconds) and peak host RSS during pruning", "",
             *_header(levels)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_cost_cell(_find(cells, m, s)) for s in levels) + " |")
    return lines


def render(results: dict[str, Any]) -> str:
    """Markdown: one perplexity table per text (cells: perplexity, actual sparsity), then time and memory."""
    dense = results.get("dense", {})
    protocol = results.get("protocol", {})
    lines: list[str] = []
    for text in evaluated_texts(results):
        lines += _perplexity_table(results, text)
    lines += _cost_table(results)
    if "model_bytes" in dense:
        lines += ["", (f"Model {dense['model_bytes'] / 2**20:.0f} MiB, one decoder layer "
                       f"{dense['layer_bytes'] / 2**20:.1f} MiB ({protocol.get('device', '')}, "
                       f"{protocol.get('threads', '?')} threads).")]
    return "\n".join(lines)
