"""Checks that run before any layer work, so that bad input fails in seconds with a clear message.

Every check raises `PreflightError` (a ValueError) whose message names the problem and the
fix; the CLI prints it as `error: ...` and exits with status 2, and nothing is written.

Before loading: numeric flags, the device, the output path (a file, a non-empty folder, inside
the input model folder, not writable), the model path (missing, no or broken config.json, an
unsupported `model_type`, truncated or empty safetensors files, a `.gguf` that is not GGUF),
the sequence lengths against the model's context, the reachable sparsity, non-finite weights
(the model's files: modelfiles.py).
After loading: the tokenizer against the embedding, non-finite weights of an in-memory model,
free disk space for the output. The calibration text (missing, empty, binary, no 'text'
field, too short for the windows) is checked by `data.load_text` / `data.split_windows`
when the windows are drawn, also before the first layer.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import PreflightError
from .modelfiles import (check_finite_model, check_finite_weights, check_model_spec, gguf_context, gguf_file,
                         read_config_json)

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


# --- numbers and devices ---------------------------------------------------------------------

def check_positive_int(value: int | None, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise PreflightError(f"{flag} {value} is out of range: use an integer >= {minimum}")


def check_finite(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise PreflightError(f"{flag} {value} is not a finite number; give a real number such as 0 or 0.5")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 63:
        raise PreflightError(f"--seed {seed} is out of range: use an integer in [0, 2**63)")


def check_device(name: str) -> torch.device:
    from .runtime.device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise PreflightError(str(e)) from None


# --- the model -------------------------------------------------------------------------------

def model_context(config: Any) -> tuple[int, str] | None:
    """(context length in tokens, the config field it came from), or None if the config has none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in CONTEXT_FIELDS:
        value = text.get(name) if isinstance(text, dict) else getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def check_context(config: Any, seqlen: int, flag: str) -> None:
    """Refuse windows longer than the model's context (position embeddings run out)."""
    ctx = model_context(config)
    if ctx is not None and seqlen > ctx[0]:
        raise PreflightError(f"{flag} {seqlen} is longer than the model's context of {ctx[0]} tokens ({ctx[1]} in "
                             f"its config); use {flag} {ctx[0]} or less")


def check_reachable(config: Any, model_config: Any) -> None:
    """Refuse a sparsity the model cannot reach (`planning.check_reachable`: one head of one KV
    group and one neuron stay per layer, --max-layer-sparsity caps each module). Without the model's
    config (a GGUF before loading) only the cap's bound is checked: no module loses more than
    max_layer_sparsity of its weights, so neither can the decoder."""
    from .arch import get_adapter
    from .allocation.budget import check_reachable as exact

    if model_config is not None:
        try:
            exact(config, get_adapter(model_config))
        except ValueError as e:
            raise PreflightError(str(e)) from None
        return
    if config.method != "structprune":  # the whole-model rankings (methods global, flap): no cap
        return
    bound = config.max_layer_sparsity
    if config.sparsity > bound + 1e-9:
        raise PreflightError(
            f"sparsity={config.sparsity} cannot be reached: with at most {bound:g} of any module removed "
            f"(--max-layer-sparsity) at most {bound:.4f} of the decoder's linear weights can go; lower --sparsity "
            f"to {math.floor(bound * 100) / 100:g} or less, or raise --max-layer-sparsity")


def check_tokenizer(tokenizer: Any, model_config: Any) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past it."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text, "vocab_size", None)
    if tokenizer is None or not isinstance(vocab, int):
        return
    n = len(tokenizer)
    if n > vocab:
        raise PreflightError(f"the tokenizer has {n} tokens but the model's embedding has {vocab} rows (vocab_size "
                             f"in config.json): ids >= {vocab} would index past it; use the tokenizer that was "
                             "saved with this model")


# --- the output ------------------------------------------------------------------------------

def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output(out: str | Path, model_spec: str | None, overwrite: bool) -> Path:
    """--out must not be a file, a non-empty folder (without overwrite), the input model folder,
    inside it or around it; the folder that will hold it (and its working folder) must be writable."""
    from .io import check_output_dir

    out = Path(os.path.expanduser(str(out)))
    try:
        check_output_dir(out, overwrite)
    except FileExistsError as e:
        raise PreflightError(str(e)) from None
    if model_spec is not None:
        model = Path(os.path.expanduser(model_spec))
        if model.exists():
            m, o = model.resolve(), out.resolve()
            model_dir = m  # a folder; beside a single file (.gguf) is fine
            if m.is_dir() and (o == model_dir or model_dir in o.parents):
                what = "is the input model folder" if o == model_dir else "is inside the input model folder"
                raise PreflightError(f"--out {str(out)!r} {what} {str(model_dir)!r}; "
                                     "write the pruned model somewhere else (e.g. a sibling folder), so the input "
                                     "stays untouched")
            if o in m.parents:
                raise PreflightError(f"the input model {str(model)!r} is inside --out {str(out)!r}; choose an --out "
                                     "that does not contain the model")
    where = _existing_ancestor(out.parent)
    if not where.is_dir():
        raise PreflightError(f"--out {str(out)!r} cannot be created: {str(where)!r} is a file; choose another --out")
    try:
        probe = tempfile.mkdtemp(prefix=".structprune-write-check-", dir=where)
        os.rmdir(probe)
    except OSError as e:
        raise PreflightError(f"--out {str(out)!r} cannot be written: {str(where)!r} is not writable "
                             f"({e.strerror}); choose an --out on a writable disk") from None
    return out


def output_bytes_estimate(total_params: int, decoder_params: int, sparsity: float, dtype_bytes: int) -> int:
    """Bytes of the pruned weights: every parameter at the output dtype, less the removed
    decoder weights (the tokenizer and metadata files are small beside them)."""
    return int((total_params - sparsity * min(decoder_params, total_params)) * dtype_bytes)


def check_disk(out: str | Path, need_bytes: int) -> None:
    """Refuse when the filesystem of --out clearly lacks room for the pruned model."""
    where = _existing_ancestor(Path(os.path.expanduser(str(out))).parent)
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        raise PreflightError(f"not enough disk space for --out {str(out)!r}: the pruned model needs about "
                             f"{human_bytes(need_bytes)}, {str(where)!r} has {human_bytes(free)} free; free some "
                             "space or choose an --out on another disk")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def source_estimate(source: Any, config: Any) -> int:
    """`output_bytes_estimate` for a LayerSource or model, in the output dtype of `config`."""
    from .arch import get_adapter
    from .allocation.budget import module_params

    if isinstance(source, torch.nn.Module):
        total = sum(p.numel() for p in source.parameters())
        dtype = next(source.parameters()).dtype
        model_config = source.config
    else:
        total = source.total_params()
        dtype = source.dtype
        model_config = source.config
    from .io.dtypes import resolve_dtype

    out_dtype = resolve_dtype(config.dtype) or dtype
    decoder = sum(module_params(get_adapter(model_config)).values())
    return output_bytes_estimate(total, decoder, config.sparsity, torch.empty((), dtype=out_dtype).element_size())


# --- the commands ----------------------------------------------------------------------------

def before_prune(args: Any, config: Any) -> None:
    """Everything about a prune command that needs no loaded model (the CLI's `args`)."""
    check_seed(config.seed)
    check_finite(getattr(args, "gamma", None), "--gamma")
    if getattr(args, "eval", False) or args.command == "demo":
        check_positive_int(args.windows, "--windows")
        check_positive_int(args.eval_seqlen, "--eval-seqlen", 2)
    check_device(config.device)
    if args.out is None:
        raise PreflightError("--out is required: the folder to write the pruned model to")
    check_output(args.out, args.model, args.overwrite)
    cfg = check_model_spec(args.model)
    gguf = gguf_file(args.model)
    if gguf is not None:  # its metadata alone, before the slow dequantizing load
        ctx = gguf_context(gguf)
        if ctx is not None:
            n = ctx[0]
            check_context({"max_position_embeddings": n}, config.seqlen, "--seqlen")
            if getattr(args, "eval", False) or args.command == "demo":
                check_context({"max_position_embeddings": n}, args.eval_seqlen, "--eval-seqlen")
        if config.prune_attention and config.prune_mlp:  # every decoder weight prunable: the bound needs no shape
            check_reachable(config, None)
    if cfg is not None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(Path(os.path.expanduser(args.model)))
        check_model_config(args, config, model_config)
        if not cfg.get("structprune"):
            check_finite_weights(Path(os.path.expanduser(args.model)))


def check_model_config(args: Any, config: Any, model_config: Any) -> None:
    check_context(model_config, config.seqlen, "--seqlen")
    if getattr(args, "eval", False) or args.command == "demo":
        check_context(model_config, args.eval_seqlen, "--eval-seqlen")
    check_reachable(config, model_config)


def after_load(args: Any, config: Any, model: Any, tokenizer: Any) -> None:
    """The checks that need the opened model: a GGUF / hub model's config, its weights, the
    tokenizer, and the room for the output."""
    if isinstance(model, torch.nn.Module):
        check_model_config(args, config, model.config)
        check_finite_model(model)
    check_tokenizer(tokenizer, model.config)
    check_disk(args.out, source_estimate(model, config))


def before_eval(model_spec: str, seqlen: int, windows: int | None, device: str) -> None:
    check_positive_int(windows, "--windows")
    check_positive_int(seqlen, "--seqlen", 2)
    check_device(device)
    cfg = check_model_spec(model_spec)
    if cfg is not None:
        check_context(cfg, seqlen, "--seqlen")


def check_info_dir(folder: str) -> None:
    """`info` reads a structprune output folder; a missing, non-model or dense folder is an error
    that says what the folder is."""
    from .io import PLAN_NAME

    path = Path(os.path.expanduser(folder))
    if not path.exists():
        raise PreflightError(f"folder {folder!r} does not exist; pass a folder written by `structprune prune`")
    if not path.is_dir():
        raise PreflightError(f"{folder!r} is a file; pass a folder written by `structprune prune`")
    if not (path / PLAN_NAME).is_file():
        if (path / "config.json").is_file():
            cfg = read_config_json(path)
            layers = cfg.get("num_hidden_layers", cfg.get("n_layer", "?"))
            raise PreflightError(f"{folder!r} is a dense (unpruned) {cfg['model_type']} model folder with {layers} "
                                 f"layers, not a structprune output: it has no {PLAN_NAME}. Prune it first "
                                 f"(structprune prune {folder} --out DIR), then run info on DIR")
        raise PreflightError(f"{folder!r} is not a structprune output folder (no {PLAN_NAME}); pass a folder "
                             "written by `structprune prune`")
