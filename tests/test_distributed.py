"""Sharded calibration over torch.distributed: real gloo process groups of 2 CPU ranks.

Tolerance: the plan (kept heads and neurons) must be identical to the single-process run on the
same windows; re-fitted weights agree within atol 1e-5 / rtol 1e-4 (float32 model). The sums
are the same sums in another order: each rank adds its own batches in float64, then the
all-reduce adds the partial sums, and a layer run on another batch composition may round its
float32 products differently; the damped solves then amplify those last-bit differences by at
most their condition number. Shards are chosen so that batch boundaries coincide with the
single-process run's (16 windows, 8 per rank, batches of 4).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY_WORDS, save_tiny_folder, tiny_model, windows

from structprune import distributed
from structprune.config import PruneConfig
from structprune.methods import method_config

WORLD = 2
FAMILIES = ("llama", "opt")
N_WINDOWS = 18  # 16 calibration windows (8 per rank) + 2 held back (1 per rank) where a search needs them
PREFIX_TOKENS = 200  # the uniform rule's rho-search prefix, cut inside rank 1's shard (5 batches of 2)


def _configs() -> dict[str, PruneConfig]:
    base = dict(sparsity=0.3, device="cpu", batch_size=4, seed=0)
    return {
        "uniform-auto-rho": PruneConfig.from_flat(**{**base, "batch_size": 2}),
        "softmax": PruneConfig.from_flat(**base, allocation="softmax"),
        "softmax-modular": PruneConfig.from_flat(**base, allocation="softmax-modular"),
        "closed-form": PruneConfig.from_flat(**base, allocation="closed-form"),
        "sensitivity": PruneConfig.from_flat(**base, allocation="sensitivity"),
        "sensitivity-linear": PruneConfig.from_flat(**base, allocation="sensitivity", sensitivity="linear"),
        "dense-target-obs": PruneConfig.from_flat(**base, rho=1.0, target="dense", selection="obs"),
        "residual": PruneConfig.from_flat(**base, rho=1.0, target="residual"),
        "wanda-sp": method_config("wanda-sp", sparsity=0.3, device="cpu", batch_size=4),
        "flap": method_config("flap", sparsity=0.3, device="cpu", batch_size=4),
    }


def _run_all() -> dict[str, dict]:
    """Every configuration on every family: plans and weights (same code on one or many ranks)."""
    from structprune import planning
    from structprune.api import prune
    from structprune.methods.flap import prune_flap

    saved, planning.RHO_SEARCH_TOKENS = planning.RHO_SEARCH_TOKENS, PREFIX_TOKENS  # ends inside rank 1's shard
    try:
        return _run_configs(prune_flap, prune, planning.needs_holdout)
    finally:
        planning.RHO_SEARCH_TOKENS = saved


def _run_configs(prune_flap, prune, needs_holdout) -> dict[str, dict]:
    out = {}
    for family in FAMILIES:
        for name, cfg in _configs().items():
            model = tiny_model(family)
            ids = windows(N_WINDOWS, 24)
            if name == "flap":
                pruned, plan = prune_flap(model, ids[:16], cfg, progress=False)
            else:
                res = prune(model, cfg, calib_windows=ids if needs_holdout(cfg) else ids[:16], progress=False)
                pruned, plan = res.model, res.plan
            out[f"{family}/{name}"] = {
                "kept": [(lp.kept_heads, lp.kept_kv_heads, lp.kept_neurons) for lp in plan.layers],
                "keep": [(lp.attn_keep_target, lp.mlp_keep_target) for lp in plan.layers],
                "info": {k: plan.allocation.get(k) for k in ("rho", "temperature")},
                "state": {k: v.clone() for k, v in pruned.state_dict().items()},
            }
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, task: str, folder: str) -> None:
    """One rank: join a gloo group of WORLD ranks, run `task`, rank 0 saves what it returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    os.environ[distributed.TIMEOUT_ENV] = "60"
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu") and distributed.world() == WORLD
    try:
        result = TASKS[task](folder)
        if rank == 0:
            torch.save(result, Path(folder) / "result.pt")
    except BaseException as e:
        (Path(folder) / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        distributed.shutdown()


def _start(task: str, folder: Path) -> list:
    """Start WORLD real processes (spawned, a fresh interpreter each) on `task`."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, task, str(folder))) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs


def _spawn(task: str, folder: Path, timeout: float = 600, procs: list | None = None) -> list[int | None]:
    """Run (or, given `procs`, finish) WORLD processes on `task`; their exit codes (None: hung, killed)."""
    procs = procs or _start(task, folder)
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def _assert_same(single: dict, sharded: dict) -> None:
    assert single.keys() == sharded.keys()
    for key in single:
        a, b = single[key], sharded[key]
        assert a["kept"] == b["kept"], f"{key}: kept units differ"
        for (x1, y1), (x2, y2) in zip(a["keep"], b["keep"]):
            assert math.isclose(x1, x2, rel_tol=1e-6) and math.isclose(y1, y2, rel_tol=1e-6), key
        for k in ("rho", "temperature"):
            if a["info"][k] is not None:
                assert math.isclose(a["info"][k], b["info"][k], rel_tol=1e-6), (key, k)
        assert a["state"].keys() == b["state"].keys()
        for name, w in a["state"].items():
            torch.testing.assert_close(b["state"][name], w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key} {name}: {m}")


def test_two_ranks_match_one_process_on_every_rule(tmp_path):
    """Uniform (rho search on a prefix), softmax, softmax-modular, closed-form and sensitivity
    allocations; local / dense / residual targets, OBS selection; wanda-sp and FLAP baselines."""
    procs = _start("run_all", tmp_path)
    single = _run_all()  # meanwhile, the single-process reference on the same windows
    codes = _spawn("run_all", tmp_path, procs=procs)
    assert codes == [0, 0], [p.read_text() for p in tmp_path.glob("error-*.txt")]
    _assert_same(single, torch.load(tmp_path / "result.pt", weights_only=False))


# --- a rank that dies, then --resume ---------------------------------------------------------

def _resume_config() -> PruneConfig:
    return PruneConfig.from_flat(sparsity=0.3, device="cpu", batch_size=4, seed=0, allocation="softmax")


class _DyingFollower(distributed.FollowerSink):
    """Rank 1's sink in the failure test: the process dies (no clean-up, as a killed worker)
    right after finishing layer 1."""

    def write_layer(self, index, prefix, layer):
        if index == 1:
            os._exit(17)


def _prune_to_folder(folder: str, resume: bool, die: bool) -> dict:
    from structprune import io
    from structprune.api import prune
    from structprune.runtime.source import layers_prefix

    out = Path(folder) / "pruned"
    if die and distributed.rank() == 1:
        sink = _DyingFollower()
    else:
        sink = distributed.rank_sink(lambda: io.ShardWriter(out, resume=resume))
    try:
        res = prune(tiny_model("llama"), _resume_config(), calib_windows=windows(N_WINDOWS, 24), progress=False,
                    sink=sink)
        model, plan = res.model, res.plan
        sink.finish(model, plan, layers_prefix(model))
    except BaseException:
        sink.abort()
        raise
    return {"kept": [(lp.kept_heads, lp.kept_kv_heads, lp.kept_neurons) for lp in plan.layers]}


TASKS = {
    "run_all": lambda folder: _run_all(),
    "die": lambda folder: _prune_to_folder(folder, resume=False, die=True),
    "resume": lambda folder: _prune_to_folder(folder, resume=True, die=False),
}


def test_killed_rank_fails_cleanly_and_resume_completes(tmp_path):
    from structprune import io
    from structprune.api import prune

    codes = _spawn("die", tmp_path, timeout=300)
    assert codes[1] == 17
    assert codes[0] not in (0, None), "rank 0 must stop with an error, not hang or succeed"
    err = (tmp_path / "error-rank0.txt").read_text()
    assert "rank 0 of 2" in err and "--resume" in err, err
    partial = io.partial_dir(tmp_path / "pruned")
    assert (partial / "model-layer-00000.safetensors").is_file()  # finished layers kept for --resume
    assert not (tmp_path / "pruned").exists()

    codes = _spawn("resume", tmp_path, timeout=300)
    assert codes == [0, 0], [p.read_text() for p in tmp_path.glob("error-*.txt")]
    single = prune(tiny_model("llama"), _resume_config(), calib_windows=windows(N_WINDOWS, 24), progress=False)
    single_model, single_plan = single.model, single.plan
    resumed = io.load_pruned(tmp_path / "pruned")
    assert torch.load(tmp_path / "result.pt", weights_only=False)["kept"] == [
        (lp.kept_heads, lp.kept_kv_heads, lp.kept_neurons) for lp in single_plan.layers]
    ref = single_model.state_dict()
    for name, w in resumed.state_dict().items():
        torch.testing.assert_close(w, ref[name], atol=1e-5, rtol=1e-4)


# --- the command line under torchrun --------------------------------------------------------

def test_torchrun_cli_matches_single_process(tmp_path):
    from structprune import io

    save_tiny_folder(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "calib.txt").write_text(" ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (4000,), generator=g)))
    args = ["prune", str(tmp_path / "tiny"), "--sparsity", "0.3", "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "16", "--seqlen", "24", "--batch-size", "4", "--device", "cpu", "--no-progress",
            "--rho", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(distributed.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           distributed.TIMEOUT_ENV: "60"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                "--master-port", str(_free_port()), "-m", "structprune"]
    run = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1  # rank 0 alone reports and writes
    one = subprocess.run([sys.executable, "-m", "structprune"] + args + ["--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = io.load_plan(tmp_path / "one"), io.load_plan(tmp_path / "two")
    assert [lp.kept_neurons for lp in a.layers] == [lp.kept_neurons for lp in b.layers]
    assert [lp.kept_heads for lp in a.layers] == [lp.kept_heads for lp in b.layers]
    wa, wb = io.load_pruned(tmp_path / "one").state_dict(), io.load_pruned(tmp_path / "two").state_dict()
    for name, w in wa.items():
        torch.testing.assert_close(wb[name], w, atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob(".two.partial*"))


def test_unsupported_options_refuse_by_name(tmp_path):
    codes = _spawn("refuse", tmp_path, timeout=300)
    assert codes == [1, 1]
    for r in range(WORLD):
        err = (tmp_path / f"error-rank{r}.txt").read_text()
        assert "NotImplementedError" in err and "reconstruction='admm'" in err, err


def _refuse(folder: str) -> None:
    from structprune.pipeline import prune_model

    prune_model(tiny_model("llama"), windows(16, 24), PruneConfig.from_flat(device="cpu", reconstruction="admm", rho=1.0),
                progress=False)


TASKS["refuse"] = _refuse


def test_split_covers_every_window_once():
    for n in range(1, 20):
        for k in range(1, 6):
            parts = [distributed.split(n, k, r) for r in range(k)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_one_fixed_gpu_for_every_rank_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        distributed.init_from_env("cuda:0")
    assert not distributed.active()
