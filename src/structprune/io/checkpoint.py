"""Save and load pruned models: safetensors weights, a config with per-layer shapes, the plan.

A folder written by `save_pruned` holds:
    model.safetensors        the weights (tied tensors stored once); or, when written layer by layer
                             while pruning (ShardWriter), model-layer-NNNNN.safetensors shards,
                             model-rest.safetensors and model.safetensors.index.json
    config.json              the family's config; `structprune.layers` lists every layer's shape,
                             and for uniform shapes the standard fields are set so plain
                             `AutoModelForCausalLM.from_pretrained` loads it ("vanilla": true)
    modeling_structprune.py  only for per-layer shapes: `auto_map` in config.json points at it, so
                             `from_pretrained(..., trust_remote_code=True)` loads without structprune
    structprune_plan.json    the plan (what each layer kept, scores, ratios, timings)
    allocation.png           per-layer kept fraction of heads and FFN neurons
    tokenizer files          when a tokenizer was given
Writes go to a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..arch import LayerShape, get_adapter
from ..plan import PrunePlan
from .dtypes import resolve_dtype

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PLAN_NAME = "structprune_plan.json"
INDEX_NAME = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists, is not empty and overwrite is off."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {str(path)!r} exists and is a file; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} exists and is not empty; "
                              "choose another --out or pass --overwrite")
    return path


def _write_metadata(tmp: Path, model: torch.nn.Module, plan: PrunePlan, tokenizer: Any,
                    extra_files: dict[str, bytes] | None) -> None:
    model.config.save_pretrained(tmp)
    from ..arch.hub import add_remote_code

    add_remote_code(tmp)  # per-layer shapes: modeling file + auto_map for trust_remote_code loading
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(tmp)
        except Exception as e:  # a malformed generation config must not lose the model
            log.warning("generation config not saved: %s", e)
    plan.save(tmp / PLAN_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    try:
        from .plots import ALLOCATION_PNG, allocation_png

        (tmp / ALLOCATION_PNG).write_bytes(allocation_png(plan))
    except Exception as e:  # a plotting problem must not lose the model
        log.warning("allocation plot not written: %s", e)
    for name, data in (extra_files or {}).items():
        (tmp / name).write_bytes(data)


def _commit(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary folder into place (replacing an old one only now)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    log.info("saved pruned model to %s", out_dir)


def _temp_beside(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def save_pruned(model: torch.nn.Module, plan: PrunePlan, out_dir: str | Path, tokenizer: Any = None,
                overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the pruned model atomically to `out_dir` (one safetensors file); returns the folder."""
    out_dir = check_output_dir(out_dir, overwrite)
    for key, t in model.state_dict().items():  # the last guard: no NaN or Inf reaches a saved weight
        if not t.is_meta and not torch.isfinite(t).all():
            raise FloatingPointError(f"non-finite values in {key}; refusing to write it")
    tmp = _temp_beside(out_dir)
    try:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_metadata(tmp, model, plan, tokenizer, extra_files)
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


PROGRESS_NAME = "progress.json"
REST_NAME = "model-rest.safetensors"  # the non-layer weights of a layer-wise run


def partial_dir(out_dir: str | Path) -> Path:
    """Where a layer-wise run keeps its finished layers until it completes (beside `out_dir`)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


class ShardWriter:
    """Writes a pruned model while the pipeline runs: one safetensors shard per finished decoder
    layer, then the rest and an index (a standard sharded checkpoint). Everything goes to a
    working folder beside `out_dir` (`partial_dir`), moved into place by `finish`.

    With `release=True` the pipeline frees each layer once written (host memory: one layer).
    Resumable: after every layer, `progress.json` records the run's fingerprint, allocation,
    the finished layers' plans and the random state; a run interrupted for any reason leaves
    the folder, and `resume=True` continues it (the pipeline replays the finished layers from
    their shards). Without `resume`, a leftover folder is an error that names both choices.
    `abort` removes the folder (used when the run fails because of its input, not interrupted)."""

    def __init__(self, out_dir: str | Path, overwrite: bool = False, release: bool = True,
                 resume: bool = False) -> None:
        self.out_dir = check_output_dir(out_dir, overwrite)
        self.release = release
        self.tmp = partial_dir(self.out_dir)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.layers_written: list[int] = []
        self.progress: dict[str, Any] | None = None
        if self.tmp.exists() and resume and (self.tmp / PROGRESS_NAME).is_file():
            self.progress = json.loads((self.tmp / PROGRESS_NAME).read_text())
        elif self.tmp.exists() and not overwrite and not resume:
            raise FileExistsError(f"an unfinished run of {str(self.out_dir)!r} is in {str(self.tmp)!r}; "
                                  "pass --resume to continue it or --overwrite to start over")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def resume_state(self, fingerprint: str) -> dict[str, Any] | None:
        """The saved progress of an interrupted run with the same fingerprint, else None (and
        the stale folder is cleared). Re-registers the finished shards."""
        prog = self.progress
        if prog is None:
            return None
        if prog.get("fingerprint") != fingerprint:
            log.warning("the unfinished run in %s used another model, configuration or calibration set; "
                        "starting over", self.tmp)
            for f in self.tmp.iterdir():
                f.unlink()
            self.progress = None
            return None
        from safetensors import safe_open

        for entry in prog["layers"]:
            name = f"model-layer-{entry['index']:05d}.safetensors"
            with safe_open(str(self.tmp / name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_slice(key)
                    self.weight_map[key] = name
                    numel = 1
                    for d in t.get_shape():
                        numel *= d
                    self.total_size += numel * _DTYPE_BYTES.get(t.get_dtype(), 4)
            self.layers_written.append(entry["index"])
        log.info("resuming %s: %d finished layer(s) replayed from %s", self.out_dir, len(prog["layers"]), self.tmp)
        return prog

    def layer_path(self, index: int) -> Path:
        return self.tmp / f"model-layer-{index:05d}.safetensors"

    def record(self, fingerprint: str, allocation: dict[str, Any], layers: list[dict[str, Any]],
               rng: list[int]) -> None:
        """Atomically rewrite progress.json after a layer's shard is on disk."""
        body = {"fingerprint": fingerprint, "allocation": allocation, "layers": layers, "rng": rng}
        tmp = self.tmp / (PROGRESS_NAME + ".tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.tmp / PROGRESS_NAME)

    def _save(self, state: dict[str, torch.Tensor], name: str) -> None:
        from safetensors.torch import save_file

        for key, t in state.items():
            if not torch.isfinite(t).all():
                raise FloatingPointError(f"non-finite values in {key}; refusing to write it")
        save_file(state, str(self.tmp / name), metadata={"format": "pt"})
        for key, t in state.items():
            if self.weight_map.get(key) != name:  # a rewrite (resumed run) is not counted twice
                self.total_size += t.numel() * t.element_size()
            self.weight_map[key] = name

    def write_layer(self, index: int, prefix: str, layer: torch.nn.Module) -> None:
        state = {f"{prefix}.{index}.{k}": v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        self._save(state, f"model-layer-{index:05d}.safetensors")
        self.layers_written.append(index)

    @staticmethod
    def _rest_state(model: torch.nn.Module, prefix: str, skip: Any = ()) -> dict[str, torch.Tensor]:
        """The real non-layer tensors of `model` (tied ones once), except the keys in `skip`."""
        seen: set[int] = set()
        rest: dict[str, torch.Tensor] = {}
        for key, t in model.state_dict().items():
            if key.startswith(prefix + ".") or t.is_meta or key in skip:
                continue
            ptr = t.data_ptr()
            if ptr in seen:  # tied weights are stored once; transformers re-ties them
                continue
            seen.add(ptr)
            rest[key] = t.detach().cpu().contiguous()
        return rest

    def release_rest(self, model: torch.nn.Module, prefix: str) -> None:
        """Write the non-layer weights (embeddings, final norm, head) now and put the model's
        parameters outside the decoder layers on the meta device (ties kept), so the layer loop
        does not hold them (OPT-6.7B: 0.8 GB of float32 embeddings). `finish` writes only what
        is still real. Call it once the head is no longer needed (after the allocation)."""
        rest = self._rest_state(model, prefix)
        if not rest:
            return
        self._save(rest, REST_NAME)
        drop_non_layer_parameters(model, prefix)

    def finish(self, model: torch.nn.Module, plan: PrunePlan, prefix: str, tokenizer: Any = None) -> Path:
        rest = self._rest_state(model, prefix, skip=self.weight_map)
        if rest or REST_NAME not in self.weight_map.values():
            self._save(rest, REST_NAME if REST_NAME not in self.weight_map.values() else "model-rest-2.safetensors")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        _write_metadata(self.tmp, model, plan, tokenizer, None)
        # progress.json goes last: until the folder is complete a failure here keeps it for --resume
        (self.tmp / PROGRESS_NAME).unlink(missing_ok=True)
        _commit(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """The run stopped early: keep finished layers for --resume, else remove the folder."""
        if self.layers_written and (self.tmp / PROGRESS_NAME).is_file():
            log.warning("the run stopped after %d finished layer(s); they are kept in %s: run the same command "
                        "with --resume to continue", len(self.layers_written), self.tmp)
            return
        shutil.rmtree(self.tmp, ignore_errors=True)


def drop_non_layer_parameters(model: torch.nn.Module, prefix: str) -> None:
    """Put every parameter outside the decoder layers (under `prefix`) on the meta device, tied
    parameters staying tied: frees the embeddings and head once the layer loop no longer needs them."""
    meta: dict[int, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for pname, p in list(module._parameters.items()):
            if p is None or p.is_meta:
                continue
            if id(p) not in meta:
                meta[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            module._parameters[pname] = meta[id(p)]


def is_pruned_folder(path: str | Path) -> bool:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return False
    return "structprune" in json.loads((path / CONFIG_NAME).read_text())


def load_pruned(path: str | Path, dtype: str = "float32") -> torch.nn.Module:
    """Rebuild a pruned model from a folder written by `save_pruned` (any per-layer shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    sharded = (path / INDEX_NAME).is_file()
    if not (path / CONFIG_NAME).is_file() or not (sharded or (path / WEIGHTS_NAME).is_file()):
        raise FileNotFoundError(f"{str(path)!r} is not a structprune output folder "
                                f"(needs {CONFIG_NAME} and {WEIGHTS_NAME} or {INDEX_NAME})")
    config = AutoConfig.from_pretrained(path)
    meta = getattr(config, "structprune", None)
    if meta is None:
        raise ValueError(f"{path / CONFIG_NAME} has no 'structprune' section; load it with transformers instead")
    shapes = [LayerShape.from_dict(s) for s in meta["layers"]]
    # vanilla: the config already has the pruned sizes; otherwise it is the dense one, reshaped per layer
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype) or torch.float32)
    if not meta.get("vanilla"):
        adapter = get_adapter(config)
        layers = adapter.decoder_layers(model)
        if len(layers) != len(shapes):
            raise ValueError(f"config lists {len(shapes)} layer shapes but the model has {len(layers)} layers")
        for layer, shape in zip(layers, shapes):
            adapter.reshape_layer(layer, shape)
    if sharded:
        from safetensors.torch import load_file

        files = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
        expected = set(model.state_dict())
        loaded: set[str] = set()
        for name in files:
            part = load_file(str(path / name))
            model.load_state_dict(part, strict=False)
            loaded |= set(part)
        missing, unexpected = sorted(expected - loaded), sorted(loaded - expected)
    else:
        missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
    missing = [m for m in missing if not ("lm_head" in m and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match the pruned shapes: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load_plan(path: str | Path) -> PrunePlan:
    return PrunePlan.load(Path(path) / PLAN_NAME)
