"""Distributed scaling (issue 17): wall time and per-rank peak memory of `structprune prune`
against the number of torchrun ranks, on the same calibration windows.

For each K in --ranks the script launches
    torchrun --nproc-per-node K benchmarks/distributed_scaling.py --worker DIR -- prune MODEL ...
(K = 1 is the single-process run: WORLD_SIZE=1, no process group). Every rank runs the CLI in
its own process and writes its peak host RSS (getrusage ru_maxrss) and, on CUDA, its peak
device memory (torch.cuda.max_memory_allocated) to DIR/rank<R>.json. The driver records the
launch-to-exit wall time, the pruning time rank 0 reports (plan.timing.prune_seconds: after the
model and the calibration text are loaded), the ratio of both to the 1-rank run, whether the
plan (kept heads and neurons) equals the 1-rank plan, and the largest weight difference to it.
CPU threads are split evenly over the ranks (--threads in all, default os.cpu_count()).

    python benchmarks/distributed_scaling.py --ranks 1 2 --nsamples 16 --seqlen 512
    python benchmarks/distributed_scaling.py --ranks 1 2 4 8 --device cuda --nsamples 64 --seqlen 512 \\
        --out benchmarks/results/distributed_scaling_cuda.json      # one GPU per rank (NCCL)

Writes --out (JSON, small) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN = "structprune_plan.json"  # io.PLAN_NAME (not imported: the driver runs before any rank)


def _worker(folder: str, argv: list[str]) -> int:
    """One torchrun rank: the CLI, then this process's peaks to FOLDER/rank<R>.json."""
    from structprune.cli import main as cli_main

    t0 = time.perf_counter()
    code = cli_main(argv)
    import torch

    rank = int(os.environ.get("RANK", "0"))
    use = resource.getrusage(resource.RUSAGE_SELF)
    peaks = {"rank": rank, "exit_code": code, "seconds": time.perf_counter() - t0,
             "cpu_seconds": use.ru_utime + use.ru_stime,
             "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(peaks))
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kept(plan_path: Path) -> list:
    plan = json.loads(plan_path.read_text())
    return [(lp["kept_heads"], lp["kept_kv_heads"], lp["kept_neurons"]) for lp in plan["layers"]]


def _max_weight_diff(a: Path, b: Path) -> float:
    from structprune.io import load_pruned

    wa, wb = load_pruned(a).state_dict(), load_pruned(b).state_dict()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].shape == wb[k].shape)


def run(ranks: list[int], prune_args: list[str], threads: int, work: Path) -> list[dict]:
    rows: list[dict] = []
    base_out: Path | None = None
    for k in ranks:
        folder = work / f"ranks{k}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        out = folder / "pruned"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // k)),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                              os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port",
               str(_free_port()), str(Path(__file__).resolve()), "--worker", str(folder), "--",
               *prune_args, "--out", str(out), "--no-progress"]
        print(f"[{k} rank(s)] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{k} rank(s) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        per_rank = sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["rank"])
        plan = json.loads((out / PLAN).read_text())
        row = {"ranks": k, "omp_threads_per_rank": max(1, threads // k), "wall_seconds": wall,
               "prune_seconds": plan["timing"]["prune_seconds"],
               "cpu_seconds_per_rank": [r["cpu_seconds"] for r in per_rank],
               "host_peak_rss_gib_per_rank": [r["host_peak_rss_bytes"] / 2**30 for r in per_rank],
               "cuda_peak_gib_per_rank": [None if r["cuda_peak_bytes"] is None else r["cuda_peak_bytes"] / 2**30
                                          for r in per_rank],
               "actual_sparsity": 1 - plan["decoder_params_pruned"] / plan["decoder_params_dense"]}
        if base_out is None:
            base_out, base = out, row
        row["wall_ratio_to_1_rank"] = wall / base["wall_seconds"]
        row["prune_ratio_to_1_rank"] = row["prune_seconds"] / base["prune_seconds"]
        row["plan_identical_to_first"] = _kept(out / PLAN) == _kept(base_out / PLAN)
        row["max_abs_weight_diff_to_first"] = _max_weight_diff(out, base_out)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    if "--worker" in sys.argv:  # a torchrun rank
        i = sys.argv.index("--worker")
        rest = sys.argv[i + 2:]
        return _worker(sys.argv[i + 1], rest[1:] if rest[:1] == ["--"] else rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all, split over ranks")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `structprune prune` options")
    p.add_argument("--out", default="benchmarks/results/distributed_scaling.json")
    args = p.parse_args()
    prune_args = ["prune", args.model, "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples),
                  "--seqlen", str(args.seqlen), "--device", args.device, *args.extra]
    with tempfile.TemporaryDirectory(prefix="structprune-dist-") as work:
        rows = run(args.ranks, prune_args, args.threads, Path(work))
    import torch

    result = {"protocol": {"command": prune_args, "ranks": args.ranks, "threads": args.threads,
                           "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "note": "wall_seconds: torchrun launch to exit (model and text loading included on "
                                   "every rank); prune_seconds: rank 0's prune_model time; cpu_seconds: each "
                                   "rank's user + system CPU time (robust to a shared machine)"},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| ranks | wall s | prune s | ratio (prune) | peak RSS GiB per rank | plan = 1 rank | max |dW| |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['wall_seconds']:.1f} | {r['prune_seconds']:.1f} | {r['prune_ratio_to_1_rank']:.2f} "
              f"| {', '.join(f'{v:.2f}' for v in r['host_peak_rss_gib_per_rank'])} | {r['plan_identical_to_first']} "
              f"| {r['max_abs_weight_diff_to_first']:.2e} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
