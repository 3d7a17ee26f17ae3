"""Save and load pruned models: safetensors weights, a config with per-layer shapes, the plan.

A folder written by `save_pruned` holds:
    model.safetensors        the weights (tied tensors stored once)
    config.json              the family's config; `structprune.layers` lists every layer's shape,
                             and for uniform shapes the standard fields are set so plain
                             `AutoModelForCausalLM.from_pretrained` loads it ("vanilla": true)
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

from .arch import LayerShape, get_adapter
from .plan import PrunePlan

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PLAN_NAME = "structprune_plan.json"


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists, is not empty and overwrite is off."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {str(path)!r} exists and is a file; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} exists and is not empty; "
                              "choose another --out or pass --overwrite")
    return path


def save_pruned(model: torch.nn.Module, plan: PrunePlan, out_dir: str | Path, tokenizer: Any = None,
                overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the pruned model atomically to `out_dir`; returns the folder."""
    out_dir = check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
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
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", out_dir)
    return out_dir


def is_pruned_folder(path: str | Path) -> bool:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return False
    return "structprune" in json.loads((path / CONFIG_NAME).read_text())


def load_pruned(path: str | Path, dtype: str = "float32") -> torch.nn.Module:
    """Rebuild a pruned model from a folder written by `save_pruned` (any per-layer shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import resolve_dtype

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a structprune output folder "
                                f"(needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = AutoConfig.from_pretrained(path)
    meta = getattr(config, "structprune", None)
    if meta is None:
        raise ValueError(f"{path / CONFIG_NAME} has no 'structprune' section; load it with transformers instead")
    shapes = [LayerShape.from_dict(s) for s in meta["layers"]]
    dense_cfg = config
    if meta.get("vanilla"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype) or torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(dense_cfg, dtype=resolve_dtype(dtype) or torch.float32)
        adapter = get_adapter(config)
        layers = adapter.decoder_layers(model)
        if len(layers) != len(shapes):
            raise ValueError(f"config lists {len(shapes)} layer shapes but the model has {len(layers)} layers")
        for layer, shape in zip(layers, shapes):
            adapter.reshape_layer(layer, shape)
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
