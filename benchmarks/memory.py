"""Memory benchmark (issue 5, PROTOCOL.md): peak memory of `structprune prune` (layer by layer)
against the global first-order Taylor baseline (whole model on the device) on random-weight
checkpoints with the exact shapes of OPT-125M ... 6.7B.

For each size: write the checkpoint (fp16 safetensors, shard by shard, cached under --cache),
run the global baseline through benchmarks/_global_runner.py (which also times the reference:
one dense forward pass of the calibration set on the same device), then `structprune prune`
through benchmarks/_cli_runner.py. Every run is a subprocess; its peak host RSS is its own
getrusage(ru_maxrss), its peak accelerator memory torch.cuda.max_memory_allocated().
Sizes that do not fit the free disk or host memory are skipped and said so. Where the global
baseline is skipped, the reference forward pass is streamed one layer at a time from the files
(same arithmetic; the whole model never needs to fit in host memory).

    OMP_NUM_THREADS=1 python benchmarks/memory.py --sizes 125m 350m 1.3b --nsamples 4 --seqlen 256
    python benchmarks/memory.py --sizes 6.7b --methods structprune --force --reconstruction none --out OUT2
    python benchmarks/memory.py --merge OUT1.json OUT2.json      # one table and plot from separate runs
    python benchmarks/memory.py --quick
    python benchmarks/memory.py --sizes 1.3b 6.7b --device cuda --dtype float16 --out benchmarks/results/memory_cuda

Writes OUT.json (rows, slopes, protocol) and OUT.png (log-log peak memory against parameters
with fitted slopes), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_report import METHODS, markdown_table, mib_text, plot, slope_text, slopes  # noqa: E402
from opt_shapes import OPT_SIZES, is_complete, layer_params, opt_config, tensor_specs, write_checkpoint  # noqa: E402

log = logging.getLogger("memory")
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Host memory per byte of model (run dtype) assumed before any size of a method was measured;
# afterwards the measured figures are extrapolated. --force skips the check.
HOST_FACTOR = {"structprune": 2.5, "global": 3.5}
CHECKPOINT_DTYPE = torch.float16


# --- plumbing: files, subprocesses -------------------------------------------------------------

def available_ram() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prepare_tokenizer(cache: Path) -> Path:
    """The default model's tokenizer (SmolLM2, 49,152 tokens < OPT's 50,272) saved once under cache."""
    import importlib.util

    from transformers import AutoTokenizer

    from structprune.io.resolve import BUILTIN

    folder = cache / "tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    package, filename, install = BUILTIN["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the tokenizer comes from the default model's package: {install}")
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=filename)
    tmp = cache / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def prepare_calib(cache: Path) -> Path:
    """The calibration split of the built-in Wikipedia text as a .txt file (PROTOCOL.md)."""
    from structprune.data import wiki_text

    path = cache / "calib.txt"
    if not path.is_file():
        path.write_text(wiki_text("calib"), encoding="utf-8")
    return path


def prepare_checkpoint(size: str, cache: Path, tokenizer: Path, run_bytes: int) -> tuple[Path | None, str]:
    """(folder, "") when the checkpoint is ready, else (None, why it was skipped)."""
    cfg = opt_config(size)
    folder = cache / f"opt-{size}"
    if is_complete(folder, cfg, CHECKPOINT_DTYPE):
        return folder, ""
    need = run_bytes // 2 + run_bytes + GIB  # fp16 checkpoint + pruned output (run dtype) + margin
    free = shutil.disk_usage(cache).free
    if free < need:
        return None, f"skipped: needs ~{need / GIB:.1f} GiB of disk under {cache}, {free / GIB:.1f} GiB free"
    log.warning("writing random OPT-%s checkpoint to %s", size, folder)
    t0 = time.perf_counter()
    write_checkpoint(cfg, folder, CHECKPOINT_DTYPE, tokenizer_dir=tokenizer)
    log.warning("  written in %.0f s", time.perf_counter() - t0)
    return folder, ""


def run(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, wall seconds); the output is also saved to `log_path`."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    log_path.write_text(" ".join(cmd) + "\n\n" + proc.stdout)
    return proc.returncode, proc.stdout, wall


def parse_int(text: str, key: str) -> int | None:
    found = re.findall(rf"^{key}=(\d+)\s*$", text, flags=re.M)
    return int(found[-1]) if found else None


def _failure(rc: int, text: str) -> str:
    if rc in (-9, 137):
        return "failed: killed (out of memory?)"
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return f"failed (exit {rc}): {tail[0][:120]}"


def measure_global(folder: Path, args: argparse.Namespace, calib: Path, env: dict[str, str], logs: Path,
                   reference_only: bool) -> dict:
    cmd = [sys.executable, str(BENCH / "_global_runner.py"), str(folder), "--calib", str(calib),
           "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--device", args.device, "--dtype", args.dtype, "--batch-size", "1"]
    if reference_only:  # streamed: the whole model need not fit in host memory
        cmd += ["--reference-only", "--streamed"]
    rc, text, wall = run(cmd, env, logs / f"{folder.name}-global.log")
    found = re.findall(r"^result=(\{.*\})\s*$", text, flags=re.M)
    if rc != 0 or not found:
        return {"status": _failure(rc, text), "wall_seconds": wall}
    res = json.loads(found[-1])
    return {"status": "ok", "wall_seconds": wall, "seconds": res.get("prune_seconds"),
            "reference": res.get("reference", "in memory"),
            "reference_seconds": res["reference_forward_seconds"], "cuda_peak_bytes": res.get("cuda_peak_bytes"),
            "host_peak_rss_bytes": res["host_peak_rss_bytes"], "actual_sparsity": res.get("actual_sparsity")}


def measure_structprune(folder: Path, args: argparse.Namespace, calib: Path, env: dict[str, str],
                        logs: Path, out: Path) -> dict:
    cmd = [sys.executable, str(BENCH / "_cli_runner.py"), "prune", str(folder), "--sparsity", str(args.sparsity),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", str(calib),
           "--out", str(out), "--overwrite", "--device", args.device, "--dtype", args.dtype, "--no-progress",
           "--log-level", "WARNING"] + (["--reconstruction", args.reconstruction] if args.reconstruction else []) \
        + (["--rho", args.rho] if args.rho else [])
    rc, text, wall = run(cmd, env, logs / f"{folder.name}-structprune.log")
    row: dict = {"wall_seconds": wall, "host_peak_rss_bytes": parse_int(text, "host_peak_rss_bytes"),
                 "cuda_peak_bytes": parse_int(text, "cuda_peak_bytes")}
    if rc != 0:
        row["status"] = _failure(rc, text)
        return row
    m = re.search(r"^pruning time\s+([\d.]+) s", text, flags=re.M)
    row["seconds"] = float(m.group(1)) if m else wall
    plan = out / "structprune_plan.json"
    if plan.is_file():
        saved = json.loads(plan.read_text())
        row["actual_sparsity"] = saved.get("actual_sparsity")
        row["allocation_seconds"] = (saved.get("allocation") or {}).get("seconds")
    row["status"] = "ok"
    shutil.rmtree(out, ignore_errors=True)
    return row


def host_need(method: str, model_bytes: int, done: list[dict]) -> float:
    """Predicted peak host RSS: the method's measured figures extrapolated linearly in model
    bytes (two or more sizes), else a fixed factor of the model size plus 1 GiB."""
    pts = sorted((r["model_bytes"], r["host_peak_rss_bytes"]) for r in done
                 if r["method"] == method and r["status"] == "ok" and r.get("host_peak_rss_bytes"))
    guess = HOST_FACTOR[method] * model_bytes + GIB
    if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        return 1.1 * (y1 + (y1 - y0) / (x1 - x0) * (model_bytes - x1))
    if pts:
        return max(pts[-1][1] * model_bytes / pts[-1][0], GIB)
    return guess


def write_outputs(rows: list[dict], args: argparse.Namespace, final: bool) -> None:
    """OUT.json and OUT.png; with `final`, also print the table and the slopes."""
    fitted = slopes(rows)
    protocol = {
        "checkpoints": "random weights N(0, 0.02), OPT shapes, fp16 safetensors on disk",
        "device": args.device, "dtype": args.dtype, "sparsity": args.sparsity,
        "calibration": f"wiki calib split, {args.nsamples} x {args.seqlen} tokens, seed 0 (SmolLM2 tokenizer)",
        "global_batch_size": 1, "structprune": "CLI defaults (method structprune, batch size 8)",
        "host_rss": "peak RSS of the whole subprocess (load, prune, save)",
        "accelerator": "torch.cuda.max_memory_allocated over the whole CLI run; around prune_global for the baseline",
        "time": "structprune: the CLI's pruning time; global: prune_global; reference: one dense forward "
                "pass of the calibration set (batch 8) on the same device, measured in the global runner "
                "(row field 'reference': 'in memory', or 'streamed' one layer at a time where the global "
                "baseline was skipped; loading not timed)",
        "reconstruction": args.reconstruction or "lstsq (CLI default)",
        "rho": args.rho or "auto (CLI default)",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"protocol": protocol, "rows": rows, "slopes": fitted}, indent=1))
    title = (f"random-weight OPT shapes, {args.device} {args.dtype}, {args.nsamples} x {args.seqlen} calibration "
             f"tokens, sparsity {args.sparsity}")
    plot(rows, fitted, out.with_suffix(".png"), title)
    if not final:
        return
    print(markdown_table(rows))
    print()
    for method, s in fitted.items():
        print(f"slope of peak memory vs parameters, {method}: accelerator {slope_text(s['cuda'])}, "
              f"host RSS {slope_text(s['host'])}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=None, choices=sorted(OPT_SIZES),
                   help="OPT shapes (default 125m 350m 1.3b; --quick: 125m 350m)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default="auto", help="float16, bfloat16, float32; auto: float16 on cuda, float32 on cpu")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 4; --quick: 2)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 256; --quick: 128)")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--reconstruction", default=None, help="structprune re-fit (default: the CLI's, lstsq)")
    p.add_argument("--rho", default=None, help="structprune --rho (default: the CLI's, auto: a held-back search)")
    p.add_argument("--cache", default="/tmp/structprune-memory", help="checkpoint cache folder")
    p.add_argument("--out", default=str(RESULTS / "memory"), help="output prefix: OUT.json and OUT.png")
    p.add_argument("--quick", action="store_true", help="small run: 125m 350m, 2 windows of 128 tokens")
    p.add_argument("--force", action="store_true", help="run sizes predicted not to fit host memory")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: join the rows of earlier runs (same settings, e.g. sizes run in "
                        "separate processes; a later file's row replaces an earlier one of the same size and "
                        "method) into OUT.json / OUT.png and print the table")
    return p


def _settle(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --quick and the device; refuse an unknown dtype."""
    args.sizes = args.sizes or (["125m", "350m"] if args.quick else ["125m", "350m", "1.3b"])
    args.nsamples = args.nsamples or (2 if args.quick else 4)
    args.seqlen = args.seqlen or (128 if args.quick else 256)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    if args.dtype not in DTYPE_BYTES:
        raise SystemExit(f"--dtype {args.dtype!r} is invalid: choose one of {sorted(DTYPE_BYTES)} or auto")


def _merge(args: argparse.Namespace) -> int:
    """--merge: join the rows of earlier runs into OUT.json / OUT.png (a later row wins)."""
    joined: dict[tuple, dict] = {}  # a later file's row replaces an earlier one of the same size and method
    for f in args.merge:
        for r in json.loads(Path(f).read_text())["rows"]:
            joined[(r["size"], r["method"])] = r
    write_outputs(sorted(joined.values(), key=lambda r: (r["params"], r["method"])), args, final=True)
    return 0


def _measure_size(size: str, args: argparse.Namespace, cache: Path, tokenizer: Any, calib: Any,
                  env: dict[str, str], logs: Path, rows: list[dict]) -> None:
    """Measure every method on OPT-`size`, appending to `rows` (skips predicted not to fit)."""
    specs = tensor_specs(opt_config(size))
    n_params = sum(math.prod(s) for _, s in specs)
    base = {"size": size, "params": n_params, "layer_params": layer_params(specs),
            "model_bytes": n_params * DTYPE_BYTES[args.dtype],
            "layer_bytes": layer_params(specs) * DTYPE_BYTES[args.dtype]}
    folder, why = prepare_checkpoint(size, cache, tokenizer, base["model_bytes"])
    ref: float | None = None
    ref_kind: str | None = None
    plans = {m: ("" if folder else why) for m in args.methods}
    for method in args.methods:
        need = host_need(method, base["model_bytes"], rows)
        if folder and not args.force and need > 0.9 * available_ram():
            plans[method] = (f"skipped: predicted host RSS ~{need / GIB:.1f} GiB, "
                             f"{available_ram() / GIB:.1f} GiB available (--force to try)")
    if folder:
        log.warning("OPT-%s: global baseline%s", size, "" if not plans.get("global") else " (reference only)")
        g = measure_global(folder, args, calib, env, logs, reference_only="global" not in plans
                           or bool(plans["global"]))
        ref, ref_kind = g.get("reference_seconds"), g.get("reference")
        if "global" in plans and not plans["global"]:
            rows.append({**base, "method": "global", **g, "reference_seconds": ref})
    if "global" in plans and plans["global"]:
        rows.append({**base, "method": "global", "status": plans["global"]})
    if "structprune" in plans:
        if plans["structprune"]:
            rows.append({**base, "method": "structprune", "status": plans["structprune"]})
        else:
            log.warning("OPT-%s: structprune", size)
            r = measure_structprune(folder, args, calib, env, logs, cache / f"out-{size}")
            rows.append({**base, "method": "structprune", **r, "reference_seconds": ref, "reference": ref_kind})
    for r in rows[-len(args.methods):]:
        log.warning("  %s %s: %s, host RSS %s MiB, accel %s MiB, %s s", size, r["method"], r["status"],
                    mib_text(r.get("host_peak_rss_bytes")), mib_text(r.get("cuda_peak_bytes")), r.get("seconds"))
    write_outputs(rows, args, final=False)  # a run cut short keeps what it measured


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _settle(args)
    if args.merge:
        return _merge(args)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    tokenizer, calib = prepare_tokenizer(cache), prepare_calib(cache)
    env = {**os.environ, "STRUCTPRUNE_REPORT_CUDA_PEAK": "1", "TOKENIZERS_PARALLELISM": "false"}
    src = str(BENCH.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    rows: list[dict] = []
    sizes = sorted(args.sizes, key=lambda s: opt_config(s).hidden_size * opt_config(s).num_hidden_layers)
    for size in sizes:
        _measure_size(size, args, cache, tokenizer, calib, env, logs, rows)

    write_outputs(rows, args, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
