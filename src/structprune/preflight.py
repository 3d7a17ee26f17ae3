"""Checks that run before any layer work, so that bad input fails in seconds with a clear message.

Every check raises `PreflightError` (a ValueError) whose message names the problem and the
fix; the CLI prints it as `error: ...` and exits with status 2, and nothing is written.

Before loading: numeric flags, the device, the output path (a file, a non-empty folder, inside
the input model folder, not writable), the model path (missing, no or broken config.json, an
unsupported `model_type`, truncated or empty safetensors files, a `.gguf` that is not GGUF),
the sequence lengths against the model's context, the reachable sparsity, non-finite weights.
After loading: the tokenizer against the embedding, non-finite weights of an in-memory model,
free disk space for the output. The calibration text (missing, empty, binary, no 'text'
field, too short for the windows) is checked by `data.load_text` / `data.split_windows`
when the windows are drawn, also before the first layer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from .arch import supported_model_types

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 24  # elements checked for finiteness at once (bounded scratch memory)


class PreflightError(ValueError):
    """Bad input found before any work; the message names the problem and the fix."""


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
    from .streaming import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise PreflightError(str(e)) from None


# --- the model -------------------------------------------------------------------------------

def _is_builtin(spec: str) -> bool:
    from .loading import ALIASES, BUILTIN

    return ALIASES.get(spec.lower(), spec.lower()) in BUILTIN


def _looks_local(spec: str) -> bool:
    """A MODEL argument meant as a local path rather than a hub id ("owner/name")."""
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors", ".json")):
        return True
    parts = Path(spec).parts
    return len(parts) != 2 or Path(parts[0]).is_dir()


def read_config_json(folder: Path) -> dict[str, Any]:
    """The parsed config.json of a model folder, or a PreflightError that says what is wrong."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise PreflightError(f"{str(folder)!r} has no config.json, so it is not a Hugging Face model folder; pass a "
                             "model folder (config.json + weights), a .gguf file, a hub id or 'smollm2-135m'")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise PreflightError(f"{cfg_path} is not valid JSON{where}; restore the model's original config.json "
                             "(re-download or re-save the model)") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise PreflightError(f"{cfg_path} has no 'model_type' field; restore the model's original config.json")
    if cfg["model_type"] not in supported_model_types():
        raise PreflightError(f"unsupported architecture model_type={cfg['model_type']!r} in {cfg_path}; structprune "
                             f"supports {', '.join(supported_model_types())}")
    return cfg


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (from its index when sharded); missing shards are an error."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise PreflightError(f"{index} is not a valid safetensors index (JSON with a 'weight_map'); re-save "
                                 "the model") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise PreflightError(f"{index} lists {missing[:3]} but {'it does' if len(missing) == 1 else 'they do'} "
                                 f"not exist in {folder}; copy the missing shards or re-save the model")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def check_safetensors_file(path: Path) -> int:
    """Validate a safetensors file's header against its size (truncated, empty, not safetensors);
    returns its number of elements."""
    size = path.stat().st_size
    fix = "re-download or re-save the model"
    if size == 0:
        raise PreflightError(f"{path} is empty (0 bytes); {fix}")
    if size < 8:
        raise PreflightError(f"{path} is truncated ({size} bytes, shorter than a safetensors header); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise PreflightError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the "
                                 f"file holds {size - 8} after the length field; {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PreflightError(f"{path} is corrupt: its header is not JSON; {fix}") from None
    end, numel = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            numel += math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise PreflightError(f"{path} is corrupt: tensor {name!r} has a malformed header entry; {fix}") from None
        end = max(end, stop)
    have = size - 8 - n
    if end > have:
        raise PreflightError(f"{path} is truncated: its header promises {end} bytes of tensor data, the file holds "
                             f"{have}; {fix}")
    return numel


def check_model_spec(spec: str) -> dict[str, Any] | None:
    """Check a MODEL argument before anything is loaded. Returns the parsed config.json of a
    local folder (None for the built-in model, a GGUF file or a hub id)."""
    if _is_builtin(spec):
        return None
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        if _looks_local(spec):
            raise PreflightError(f"model path {spec!r} does not exist; check the path (a local folder with "
                                 "config.json and weights, a .gguf file, a hub id such as owner/name, or "
                                 "'smollm2-135m')")
        return None  # a hub id: the loader says what happens without the network
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix == ".gguf" or magic == GGUF_MAGIC:
            if magic != GGUF_MAGIC:
                raise PreflightError(f"{spec!r} is not a GGUF model file (it does not start with the GGUF magic "
                                     "bytes); pass a real .gguf model, a Hugging Face model folder or 'smollm2-135m'")
            return None
        raise PreflightError(f"{spec!r} is a file, not a model folder; pass a Hugging Face model folder "
                             "(config.json + weights), a .gguf file, a hub id or 'smollm2-135m'")
    cfg = read_config_json(path)
    files = safetensors_files(path)
    for f in files:
        check_safetensors_file(f)
    if not files and not any(path.glob("*.bin")) and not (path / "structprune_plan.json").is_file():
        raise PreflightError(f"{str(path)!r} has config.json but no weights (model.safetensors, a sharded index or "
                             "pytorch_model.bin); save the model's weights into that folder")
    return cfg


def gguf_file(spec: str) -> Path | None:
    """The GGUF file a MODEL argument names (the built-in model is one), else None."""
    if _is_builtin(spec):
        from .loading import ALIASES, _builtin_gguf

        return _builtin_gguf(ALIASES.get(spec.lower(), spec.lower()))
    path = Path(os.path.expanduser(spec))
    return path if path.is_file() and path.suffix == ".gguf" else None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_context(path: Path) -> tuple[int, str] | None:
    """(context length, its key) from a GGUF file's metadata, read up to that key only (no tensor,
    no vocabulary parsed: a fraction of a second where transformers' parser takes seconds).
    A file that is not a readable GGUF is a PreflightError."""
    def bad(why: str) -> PreflightError:
        return PreflightError(f"{str(path)!r} could not be read as a GGUF model ({why}); pass a complete .gguf "
                              "model, or a Hugging Face model folder")

    with open(path, "rb") as f:
        def take(fmt: str) -> Any:
            raw = f.read(struct.calcsize(fmt))
            if len(raw) != struct.calcsize(fmt):
                raise bad("the file ends inside its metadata: truncated")
            return struct.unpack(fmt, raw)[0]

        def text() -> str:
            n = take("<Q")
            if n > 1 << 24:
                raise bad("a metadata string is implausibly long: corrupt")
            return f.read(n).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == 8:
                return text()
            if kind == 9:
                inner, count = take("<I"), take("<Q")
                if inner in _GGUF_SCALARS:  # skip fixed-size elements at once
                    f.seek(struct.calcsize(_GGUF_SCALARS[inner]) * count, os.SEEK_CUR)
                    return None
                for _ in range(count):
                    value(inner)
                return None
            raise bad(f"unknown metadata type {kind}: corrupt")

        if f.read(4) != GGUF_MAGIC:
            raise bad("no GGUF magic bytes")
        version = take("<I")
        if version not in (2, 3):
            raise bad(f"GGUF version {version}; versions 2 and 3 are supported")
        take("<Q")  # tensor count
        arch = None
        for _ in range(take("<Q")):
            key = text()
            v = value(take("<I"))
            if key == "general.architecture":
                arch = v
            elif arch is not None and key == f"{arch}.context_length" and isinstance(v, int):
                return v, key
    return None


def _has_nonfinite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return False
    flat = t.reshape(-1)
    return any(not bool(torch.isfinite(c).all()) for c in flat.split(_CHUNK))


def check_finite_weights(folder: Path) -> None:
    """Refuse weights with NaN or Inf, naming the tensor. Read one tensor at a time (each file
    is opened per tensor, so no memory map of a whole file stays resident)."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(str(path), framework="pt") as f:
                bad = _has_nonfinite(f.get_tensor(key))
            if bad:
                raise PreflightError(f"weight {key!r} in {path} holds NaN or Inf values; the checkpoint is broken "
                                     "(re-download it, or repair that tensor before pruning)")


def check_finite_model(model: torch.nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_meta and _has_nonfinite(p.detach()):
            raise PreflightError(f"weight {name!r} of the model holds NaN or Inf values; the checkpoint is broken "
                                 "(re-download it, or repair that tensor before pruning)")


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
    """The obvious bound: no module loses more than max_layer_sparsity of its weights, so the
    decoder cannot lose more than max_layer_sparsity x the prunable share of its weights."""
    from .arch import get_adapter
    from .planning import module_params, prunable_keys

    if model_config is None:  # both kinds prunable: every decoder weight is
        bound = config.max_layer_sparsity
    else:
        try:
            adapter = get_adapter(model_config)
        except ValueError as e:
            raise PreflightError(str(e)) from None
        params = module_params(adapter)
        total = sum(params.values())
        prunable = sum(params[k] for k in prunable_keys(config, adapter))
        bound = config.max_layer_sparsity * prunable / total if total else 0.0
    if config.sparsity > bound + 1e-9:
        kinds = ("heads and FFN neurons" if config.prune_attention and config.prune_mlp
                 else "FFN neurons only" if config.prune_mlp else "heads only")
        raise PreflightError(
            f"sparsity={config.sparsity} cannot be reached: pruning {kinds} with at most {config.max_layer_sparsity:g} "
            f"of any module removed (--max-layer-sparsity) leaves at most {bound:.4f} of the decoder's linear "
            f"weights to remove; lower --sparsity to {math.floor(bound * 100) / 100:g} or less, or raise "
            "--max-layer-sparsity" + ("" if config.prune_attention and config.prune_mlp else " or prune --modules both"))


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
    from .planning import module_params

    if isinstance(source, torch.nn.Module):
        total = sum(p.numel() for p in source.parameters())
        dtype = next(source.parameters()).dtype
        model_config = source.config
    else:
        total = source.total_params()
        dtype = source.dtype
        model_config = source.config
    from .loading import resolve_dtype

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
