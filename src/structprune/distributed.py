"""Data-parallel calibration over torch.distributed: shard the windows, all-reduce the sums.

Launched by torchrun (`torchrun --nproc-per-node K -m structprune prune ...`), every rank loads
the same model and the same calibration (and held-back) windows, keeps a contiguous shard of
them (`shard_windows`), and runs the current layer on its shard only. Every statistic the
method reads is a sum over calibration tokens, so each is all-reduced before any decision
(`reduce_gram`, `reduce_sums`, `gather_cat`): every rank then holds the single-process sums
(up to summation order) and takes the same decisions (kept units, temperatures, rho, re-fitted
weights). Rank 0 writes the output (`rank_sink`); the others write nothing.

Precision: sums are reduced in the dtype the single-process run sums them in (float64; a Gram
matrix above `GramAccumulator.float64_max_bytes` in float32, as on one process).

What each rank holds: the model skeleton and one decoder layer at a time (as on one process),
its shard of the calibration activations (1/K of them) and the full-size statistics of the
projection being pruned (Gram matrices are not sharded: they are [n+1, n+1] whatever the tokens).

Failure: the process group is created with a timeout (`STRUCTPRUNE_DIST_TIMEOUT_S`, default
1800 s); a rank that dies makes the next collective fail on the others (gloo: connection closed;
NCCL: the timeout), which is raised as a RuntimeError naming the collective; rank 0 keeps the
finished layers, and rerunning the same command with --resume completes the run.

Outside torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT_ENV = "STRUCTPRUNE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


# --- process group ----------------------------------------------------------------------------

def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from e


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError as e:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from e
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return value


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1; returns whether this process runs distributed.
    Backend: NCCL when the run uses CUDA (each rank on cuda:LOCAL_RANK), gloo otherwise."""
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    if device.startswith("cuda:"):
        raise ValueError(f"device={device!r} would put every rank on one GPU; under torchrun use --device cuda "
                         "(or auto): each rank runs on cuda:LOCAL_RANK")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set; launch with torchrun")
    use_cuda = torch.cuda.is_available() and device != "cpu" and not device.startswith("mps")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def _device() -> torch.device:
    """Where the backend reduces: the current CUDA device for NCCL, the host for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError and gloo/NCCL failures are RuntimeErrors
        raise RuntimeError(f"rank {dist.get_rank()} of {dist.get_world_size()}: the {what} with the other ranks "
                           f"failed (a rank died, or none answered within {timeout_s():g} s, {TIMEOUT_ENV}): {e}. "
                           "Finished layers are kept: rerun the same command with --resume") from e


# --- what runs sharded ------------------------------------------------------------------------

def unsupported(config: Any) -> list[str]:
    """The options of `config` (a PruneConfig) that cannot run sharded yet."""
    out = []
    if config.method == "global":
        out.append("scope='global' (method 'global': whole-model gradients)")
    if config.refit.method == "admm":
        out.append("reconstruction='admm' (its iterations read every token's activations)")
    return out


def check_supported(config: Any) -> None:
    """Refuse, before any work, a configuration that does not run sharded yet."""
    if not active():
        return
    bad = unsupported(config)
    if bad:
        raise NotImplementedError(f"not supported under torch.distributed yet: {'; '.join(bad)}. "
                                  "Run it on one process (without torchrun)")


# --- sharding ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """This rank's calibration windows [start, stop) of `total`, in batches of `batch` (the
    single-process run's device batch)."""

    start: int
    stop: int
    total: int
    batch: int


_shard: Shard | None = None  # the calibration shard of this process's current run


def split(n: int, k: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous share of n items over k ranks (the first n % k ranks get one more)."""
    base, extra = divmod(n, k)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard_windows(windows: torch.Tensor, holdout: torch.Tensor | None, batch: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's contiguous shard of the calibration and held-back windows (a held-back shard
    may be empty). Checks first that every rank was given the same windows."""
    global _shard
    if not active():
        return windows, holdout
    k, r = world(), rank()
    if windows.shape[0] < k:
        raise ValueError(f"{windows.shape[0]} calibration window(s) cannot be sharded over {k} ranks; "
                         f"use nsamples >= {k} or fewer ranks")
    h = hashlib.sha256(windows.cpu().contiguous().numpy().tobytes())
    if holdout is not None:
        h.update(holdout.cpu().contiguous().numpy().tobytes())
    digests: list[Any] = [None] * k
    _collective("check of the calibration windows", lambda: dist.all_gather_object(digests, h.hexdigest()))
    if len(set(digests)) != 1:
        raise ValueError("the ranks were given different calibration windows; every rank must load the same "
                         "model, text, nsamples, seqlen and seed")
    start, stop = split(windows.shape[0], k, r)
    _shard = Shard(start, stop, windows.shape[0], batch)
    if holdout is not None:
        hs, he = split(holdout.shape[0], k, r)
        holdout = holdout[hs:he]
    log.info("rank %d: calibration windows [%d, %d) of %d", r, start, stop, windows.shape[0])
    return windows[start:stop], holdout


def token_prefix(hidden: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """This rank's part of the single-process run's first batches holding >= `tokens` tokens
    (`LayerStream.prefix` over the whole calibration stream), so a prefix statistic is the
    same sum as on one process. May be empty."""
    if _shard is None or not hidden:
        raise RuntimeError("token_prefix needs the shard of shard_windows; this is a bug, please report it")
    s = _shard
    seqlen = hidden[0].shape[1]
    batches = -(-tokens // (s.batch * seqlen))  # the single-process run stops after this many batches
    end = min(s.total, batches * s.batch)
    take = max(0, min(s.stop, end) - s.start)  # this rank's windows inside the global prefix
    out = []
    for x in hidden:
        if take <= 0:
            break
        out.append(x[:take])
        take -= x.shape[0]
    return out


# --- reductions -------------------------------------------------------------------------------

def _sum_(t: torch.Tensor, what: str) -> None:
    """All-reduce (sum) `t` in place, in its own dtype."""
    dev = _device()
    buf = t if t.device == dev and t.is_contiguous() else t.to(dev).contiguous()
    _collective(f"all-reduce of {what}", lambda: dist.all_reduce(buf))
    if buf is not t:
        t.copy_(buf)


def reduce_gram(acc: Any) -> None:
    """Sum a `GramAccumulator`'s statistics over the ranks, in place (count, per-column sums in
    float64, Gram sums in their own dtype). Call once, after the last local batch."""
    if not active():
        return
    count = torch.tensor([float(acc.count)], dtype=torch.float64)
    _sum_(count, "the token count")
    acc.count = int(count.item())
    _sum_(acc.col_sum, "the per-column sums")
    _sum_(acc.sq_sum, "the per-column sums of squares")
    if not acc.full or acc.released:
        return
    split_here = torch.tensor([0.0 if acc.single_stream else 1.0], dtype=torch.float64)
    _sum_(split_here, "the stream flags")
    if split_here.item() > 0 and acc.single_stream:  # another rank saw two streams: the sums part here too
        acc._cross, acc._gram_d = acc.gram.clone(), acc.gram.clone()
    _sum_(acc.gram, "the Gram matrix")
    if not acc.single_stream:
        _sum_(acc._cross, "the cross-Gram matrix")
        _sum_(acc._gram_d, "the dense Gram matrix")


def reduce_sums(*values: float) -> list[float]:
    """Sum Python numbers over the ranks in float64 (e.g. a loss sum and its token count)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    _sum_(t, "the loss sums")
    return t.tolist()


def reduce_target(target: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor, float] | None:
    """Sum the residual target's sums (T, sum ||t||^2) over the ranks."""
    if not active() or target is None:
        return target
    _sum_(target[0], "the residual target")
    return target[0], reduce_sums(target[1])[0]


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D `t` (rank order; lengths may differ, may be empty)."""
    if not active():
        return t
    dev = _device()
    n = torch.tensor([t.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    _collective("gather of sizes", lambda: dist.all_gather(sizes, n))
    m = max(int(s.item()) for s in sizes)
    buf = torch.zeros(m, dtype=t.dtype, device=dev)
    buf[:t.numel()] = t.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world())]
    _collective("gather of per-token statistics", lambda: dist.all_gather(parts, buf))
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(t.device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    _collective("broadcast from rank 0", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


# --- output: rank 0 writes --------------------------------------------------------------------

class LeaderSink:
    """Rank 0's sink: an `io.ShardWriter` that also sends the resume state and finished layers
    of an interrupted run to the other ranks (they replay them from rank 0's files)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def resume_state(self, fingerprint: str) -> dict[str, Any] | None:
        return broadcast_object(self.inner.resume_state(fingerprint))

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return broadcast_object(load_file(str(self.inner.layer_path(index))))


class FollowerSink:
    """The sink of ranks other than 0: writes nothing, frees each finished layer, and receives
    rank 0's resume state."""

    release = True

    def resume_state(self, fingerprint: str) -> dict[str, Any] | None:
        return broadcast_object(None)

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        return broadcast_object(None)

    def write_layer(self, index: int, prefix: str, layer: torch.nn.Module) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def release_rest(self, model: torch.nn.Module, prefix: str) -> None:
        """Put the parameters outside the decoder layers on the meta device (ties kept), as rank 0
        does once it has written them: the layer loop does not need the embeddings or the head."""
        from .io import drop_non_layer_parameters

        drop_non_layer_parameters(model, prefix)

    def finish(self, *args: Any, **kwargs: Any) -> None:
        return None

    def abort(self) -> None:
        pass


def rank_sink(make: Callable[[], Any]) -> Any:
    """The sink for this rank: `make()` (an io.ShardWriter) on one process; wrapped on rank 0;
    a FollowerSink elsewhere (nothing is created or written there)."""
    if not active():
        return make()
    return LeaderSink(make()) if rank() == 0 else FollowerSink()
