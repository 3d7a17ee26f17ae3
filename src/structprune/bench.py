"""The quality harness (`structprune bench quality`, PROTOCOL.md): methods x actual sparsity.

One run = one JSON file. Every cell (method, sparsity) prunes the same model on the same
calibration windows (the calibration split of `calib`) and records the ACTUAL decoder
sparsity, perplexity on the evaluation split of every text in `texts`, pruning time as a
ratio to one dense forward pass of the calibration set (measured once per run, same device),
and peak memory (process peak RSS over the pruning call; CUDA peak allocated on a GPU).
Resumable: finished cells are never recomputed; the JSON is rewritten atomically after the
dense reference and after every cell, so a killed run loses at most the cell in progress.
Evaluation text never overlaps calibration text: named texts ("wiki", "pydoc") are split by
document; a file given both for calibration and evaluation is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import PruneConfig
from .data import NAMED_TEXTS, eval_windows, load_text, tokenize

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("random", "wanda-sp", "flap", "structprune")
DEFAULT_SPARSITIES = (0.2, 0.3, 0.5)
DEFAULT_TEXTS = ("wiki", "pydoc")
DEFAULT_CALIB = "wiki"
FULL = {"nsamples": 16, "seqlen": 512, "windows": 64}  # the harness default (16 windows: CPU time)
QUICK = {"nsamples": 2, "seqlen": 128, "windows": 2}


@dataclass
class BenchSettings:
    """What one run measures; stored in the JSON and checked when a run is resumed."""

    model: str = "smollm2-135m"
    methods: tuple[str, ...] = DEFAULT_METHODS
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    nsamples: int = FULL["nsamples"]
    seqlen: int = FULL["seqlen"]
    windows: int = FULL["windows"]
    calib: str = DEFAULT_CALIB
    texts: tuple[str, ...] = DEFAULT_TEXTS
    overrides: dict[str, Any] = field(default_factory=dict)  # PruneConfig fields for every cell
    tag: str = ""
    masks_from: str | None = None
    device: str = "auto"
    max_cells: int | None = None  # stop after this many NEW cells (time-sliced runs)
    lora_steps: int = 0  # >0: LoRA recovery (finetune.py, default settings) after pruning each cell

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the file it continues."""
        return {"model": self.model, "nsamples": self.nsamples, "seqlen": self.seqlen, "windows": self.windows,
                "calib": self.calib}

    def plan_name(self, key: str) -> str:
        """File name of a cell's plan in plans/ (compact: gzipped JSON without per-unit scores,
        `PrunePlan.save(scores=False)`). Runs with other calibration settings share that folder,
        so their plans carry the calibration in the name (the harness default keeps the plain
        `<cell>.json.gz`): a 64-window run never overwrites the 16-window plan of the same cell."""
        if (self.calib, self.nsamples, self.seqlen) == (DEFAULT_CALIB, FULL["nsamples"], FULL["seqlen"]):
            return f"{key}.json.gz"
        return f"{key}.calib-{Path(self.calib).stem}-{self.nsamples}x{self.seqlen}.json.gz"


# --- memory and time ----------------------------------------------------------------------------

def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux clear_refs 5); False where not possible, in which
    case the peak is the process lifetime's (a bound, stated in the result)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last reset, in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_bytes() -> int:
    return (_status_kib("VmRSS") or 0) * 1024


def module_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def dense_forward_seconds(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Time of one dense forward pass of the calibration set through the decoder (the reference)."""
    from .runtime.hooks import calibration_mode

    base = model.get_submodule("model") if hasattr(model, "model") else model
    t0 = time.perf_counter()
    with calibration_mode(model):
        for start in range(0, windows.shape[0], batch_size):
            base(input_ids=windows[start : start + batch_size], use_cache=False)
    return time.perf_counter() - t0


# --- results file -------------------------------------------------------------------------------

def load_results(path: Path) -> dict[str, Any]:
    """A saved run ({"cells": {...}, ...}); an empty run when the file does not exist."""
    if not path.exists():
        return {"cells": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise ValueError(f"{path} is not a quality-run JSON (no 'cells' object)")  # noqa: TRY004 (a bad file)
    return data


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def cell_key(method: str, tag: str, sparsity: float) -> str:
    return f"{method}{tag}@{sparsity}"


def parse_field(name: str, text: str) -> Any:
    """A FIELD=VALUE override typed like the PruneConfig default ("false" is False for booleans)."""
    defaults = PruneConfig().to_flat()
    if name not in defaults:
        raise ValueError(f"--set {name}: not a PruneConfig field")
    default = defaults[name]
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {name}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, str):
        return text
    return type(default)(text)


def _settings_from_protocol(protocol: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fingerprint of a file written before "settings" was recorded (its protocol strings)."""
    if not protocol:
        return None
    calib = re.search(r"(\w+) calib split, (\d+) x (\d+)", protocol.get("calib", ""))
    ev = re.search(r"first (\d+) x (\d+)", protocol.get("eval", ""))
    if not calib or not ev:
        return None
    return {"model": protocol.get("model"), "nsamples": int(calib.group(2)), "seqlen": int(calib.group(3)),
            "windows": int(ev.group(1)), "calib": calib.group(1)}


def _check_disjoint(settings: BenchSettings) -> None:
    for text in settings.texts:
        if text == settings.calib and text not in NAMED_TEXTS:
            raise ValueError(f"text {text!r} is both the calibration and an evaluation text, and a plain file has "
                             "no held-out split; give a different file for evaluation")


# --- the run ------------------------------------------------------------------------------------

def run_quality(settings: BenchSettings, out: Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the grid into `out` (JSON); returns the results dict. Plans of finished
    cells are saved beside it in plans/ (`BenchSettings.plan_name`)."""
    import structprune as sp

    from .arch import get_adapter
    from .loading import load_model
    from .api import calibration_data
    from .methods import method_config
    from .runtime.device import resolve_device

    _check_disjoint(settings)
    for name, value in settings.overrides.items():  # fail before loading anything
        PruneConfig.from_flat(**{name: value})
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    old = results.get("settings") or _settings_from_protocol(results.get("protocol"))
    if old is not None and {k: old.get(k) for k in settings.fingerprint()} != settings.fingerprint():
        raise ValueError(f"{out} was run with {old}, not {settings.fingerprint()}; "
                         "use another --out for other settings")
    plans = out.parent / "plans"
    plans.mkdir(exist_ok=True)
    todo = [(m, s) for m in settings.methods for s in settings.sparsities
            if cell_key(m, settings.tag, s) not in results["cells"]]
    texts_missing = [t for t in settings.texts if t not in results.get("dense", {}).get("perplexity_by_text", {})]
    if not todo and not texts_missing:
        echo(f"{out}: every cell is finished")
        return results

    device = resolve_device(settings.device)
    model, tok = load_model(settings.model)
    adapter = get_adapter(model.config)
    # the reference forward's windows: those of a cell that searches nothing on held-back data
    calib_cfg = PruneConfig.from_flat(nsamples=settings.nsamples, seqlen=settings.seqlen, calib=settings.calib, rho=1.0)
    calib = calibration_data(tok, calib_cfg)
    evals = {t: eval_windows(tokenize(tok, load_text(t, split="eval")), settings.seqlen, settings.windows)
             for t in settings.texts}

    results["settings"] = {**settings.fingerprint(), "texts": list(settings.texts)}
    results["protocol"] = {
        "model": settings.model,
        "calib": f"{settings.calib} calib split, {settings.nsamples} x {settings.seqlen}, seed {calib_cfg.seed}",
        "eval": f"wiki eval split, first {settings.windows} x {settings.seqlen}, float32",
        "eval_texts": {t: f"{t} eval split, first {settings.windows} x {settings.seqlen}, float32"
                       for t in settings.texts},
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}
    dense = results.setdefault("dense", {})
    dense.setdefault("params", sum(p.numel() for p in model.parameters()))
    dense["model_bytes"] = module_bytes(model)
    dense["layer_bytes"] = module_bytes(adapter.decoder_layers(model)[0])
    dense["shape"] = adapter.dense_shape().to_dict()
    by_text = dense.setdefault("perplexity_by_text", {})
    for t in settings.texts:
        if t not in by_text:
            by_text[t] = sp.perplexity(model, evals[t], device=device, progress=False)
            echo(f"dense {t}: perplexity {by_text[t]:.2f}")
    if "wiki" in by_text:
        dense["perplexity"] = by_text["wiki"]
    write_atomic(out, results)

    ref = dense_forward_seconds(model, calib, 8)
    results["dense_forward_seconds_last"] = ref
    for done, (method, s) in enumerate(todo):
        if settings.max_cells is not None and done >= settings.max_cells:
            echo(f"stopping after {done} new cell(s) (--max-cells); run again to continue")
            break
        key = cell_key(method, settings.tag, s)
        cfg = method_config(method, sparsity=s, nsamples=settings.nsamples, seqlen=settings.seqlen,
                            calib=settings.calib, device=settings.device, **settings.overrides)
        masks = sp.PrunePlan.load(plans / settings.plan_name(cell_key(settings.masks_from, '', s))) \
            if settings.masks_from else None
        cell_calib, holdout = calibration_data(tok, cfg, holdout=True)  # drawn outside the timed call
        rss_before = rss_bytes()
        exact = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = sp.prune(model, cfg, calib_windows=cell_calib, progress=False, holdout_windows=holdout, masks=masks)
        seconds = time.perf_counter() - t0
        memory = {"peak_rss_bytes": peak_rss_bytes(), "rss_before_bytes": rss_before,
                  "peak_rss_scope": "pruning call" if exact else "process lifetime"}
        if device.type == "cuda":
            memory["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        lora = None
        if settings.lora_steps:
            from .api import finetune
            from .finetune import FinetuneConfig

            tuned, lora = finetune(res.model, tok, FinetuneConfig(steps=settings.lora_steps, device=settings.device),
                                   progress=False)
            res.model = tuned
        ppl = {t: sp.perplexity(res.model, evals[t], device=device, progress=False) for t in settings.texts}
        plan = res.plan
        results["cells"][key] = {
            "method": method + settings.tag, "requested": s, "actual": plan.actual_sparsity,
            "perplexity": ppl.get("wiki", next(iter(ppl.values()))), "perplexity_by_text": ppl,
            "params": plan.params_pruned, "prune_seconds": seconds, "time_ratio": seconds / ref,
            "memory": memory, "config": cfg.to_dict(),
            "allocation": {k: v for k, v in plan.allocation.items() if k != "importance"},
            "kept": {"heads": [len(lp.kept_heads) for lp in plan.layers],
                     "kv_heads": [len(lp.kept_kv_heads) for lp in plan.layers],
                     "neurons": [len(lp.kept_neurons) for lp in plan.layers]},
            **({"lora": lora} if lora is not None else {}),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        plan.save(plans / settings.plan_name(key), scores=False)
        write_atomic(out, results)
        echo(f"{key}: actual {plan.actual_sparsity:.3f} " + " ".join(f"{t} {v:.2f}" for t, v in ppl.items())
             + f" ({seconds:.0f} s, {seconds / ref:.1f}x dense fwd, peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB)")
        del res
    return results


# --- rendering ----------------------------------------------------------------------------------

def _texts(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for c in results["cells"].values():
        for t in c.get("perplexity_by_text", {"wiki": None}):
            if t not in names:
                names.append(t)
    return names or ["wiki"]


def _ppl(cell: dict[str, Any], text: str) -> float | None:
    by = cell.get("perplexity_by_text")
    if by is not None:
        return by.get(text)
    return cell.get("perplexity") if text == "wiki" else None


def render(results: dict[str, Any]) -> str:
    """Markdown: one perplexity table per text (cells: perplexity, actual sparsity), then time and memory."""
    cells = results["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    levels = sorted({c["requested"] for c in cells.values()})
    dense = results.get("dense", {})
    protocol = results.get("protocol", {})
    lines: list[str] = []
    for text in _texts(results):
        d = dense.get("perplexity_by_text", {}).get(text, dense.get("perplexity") if text == "wiki" else None)
        what = protocol.get("eval_texts", {}).get(text, protocol.get("eval", "") if text == "wiki" else text)
        lines += [f"Perplexity on {text} ({what}); dense {d:.2f}" if d is not None else f"Perplexity on {text}", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for m in methods:
            row = []
            for s in levels:
                c = next((c for c in cells.values() if c["method"] == m and c["requested"] == s), None)
                v = None if c is None else _ppl(c, text)
                row.append("-" if v is None else f"{v:.2f} (actual {c['actual']:.3f})")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Pruning time (x one dense calibration forward; seconds) and peak host RSS during pruning", "",
              "| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |", "|---|" + "---|" * len(levels)]
    for m in methods:
        row = []
        for s in levels:
            c = next((c for c in cells.values() if c["method"] == m and c["requested"] == s), None)
            if c is None:
                row.append("-")
                continue
            mem = c.get("memory", {})
            extra = f", {mem['peak_rss_bytes'] / 2**20:.0f} MiB" if "peak_rss_bytes" in mem else ""
            if "cuda_peak_bytes" in mem:
                extra += f", CUDA {mem['cuda_peak_bytes'] / 2**20:.0f} MiB"
            row.append(f"{c['time_ratio']:.1f}x ({c['prune_seconds']:.0f} s{extra})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if "model_bytes" in dense:
        lines += ["", (f"Model {dense['model_bytes'] / 2**20:.0f} MiB, one decoder layer "
                       f"{dense['layer_bytes'] / 2**20:.1f} MiB ({protocol.get('device', '')}, "
                       f"{protocol.get('threads', '?')} threads).")]
    return "\n".join(lines)

