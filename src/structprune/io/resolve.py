"""Resolve a MODEL argument to a transformers model and tokenizer on the host.

MODEL is one of: a built-in name (the table in builtin.py: "smollm2-135m", alias "default", and
"gemma3-270m"), a GGUF file, a local Hugging Face folder (a structprune output folder is rebuilt
with its pruned shapes), or a hub id (needs the network).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .builtin import ALIASES, BUILTIN, builtin_gguf, canonical
from .checkpoint import is_pruned_folder, load_pruned
from .dtypes import resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["ALIASES", "BUILTIN", "builtin_gguf", "load_model", "open_for_pruning"]


def _strip_gguf(model: Any) -> Any:
    """A GGUF-loaded model carries a quantization_config that blocks save_pretrained: drop it,
    since the weights are already dequantized floats."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        delattr(cfg, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    model.is_quantized = False
    return model


def load_model(spec: str, dtype: str = "float32") -> tuple[Any, Any]:
    """(model in eval mode on the host, tokenizer) for a MODEL argument."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    kw: dict[str, Any] = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    name = canonical(spec)
    if name in BUILTIN:
        path = builtin_gguf(name)
        return _load_gguf(path, kw)
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist; check the path")
        return _load_gguf(path, kw)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{spec!r} is not a model folder (no config.json); pass a Hugging Face model folder, "
                "a .gguf file, a hub id or 'smollm2-135m'")
        from transformers import AutoConfig

        from ..arch import get_adapter

        get_adapter(AutoConfig.from_pretrained(path))  # unsupported families fail before any weight is read
        if is_pruned_folder(path):
            return load_pruned(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise FileNotFoundError(f"model path {spec!r} does not exist; check the path")
    try:  # a hub id
        model = AutoModelForCausalLM.from_pretrained(spec, **kw)
        tok = AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load {spec!r}: not a local path, and the hub could not provide it ({e}). "
            "Offline, pass a local folder, a .gguf file, or 'smollm2-135m'") from e
    return model.eval(), tok


def _load_gguf(path: Path, kw: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s (GGUF, dequantized to float)", path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return _strip_gguf(model).eval(), tok


def open_for_pruning(spec: str, dtype: str = "float32") -> tuple[Any, Any]:
    """(weights, tokenizer) for pruning: a `SafetensorsSource` that reads one layer at a time when
    MODEL is a local Hugging Face folder with safetensors weights, else the loaded model."""
    from transformers import AutoConfig, AutoTokenizer

    from ..arch import get_adapter
    from ..runtime.source import SafetensorsSource

    path = Path(os.path.expanduser(spec))
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if path.is_dir() and (path / "config.json").is_file() and has_weights and not is_pruned_folder(path):
        get_adapter(AutoConfig.from_pretrained(path))
        torch_dtype = resolve_dtype(dtype) or torch.float32
        log.info("streaming %s from its safetensors files, one decoder layer at a time", path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # weights without a tokenizer: calibration ids must be given
            log.warning("no usable tokenizer in %s (%s)", path, str(e).splitlines()[0])
            tok = None
        return SafetensorsSource(path, torch_dtype), tok
    return load_model(spec, dtype)
