"""Checks of a MODEL argument's files before anything is loaded: the path, config.json, the
safetensors headers against the file sizes, a GGUF file's magic and metadata, and NaN / Inf in
the weights. Each problem is a `PreflightError` that names the file (or tensor) and the fix."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from .arch import supported_model_types
from .errors import PreflightError

GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 24  # elements checked for finiteness at once (bounded scratch memory)


def _is_builtin(spec: str) -> bool:
    from .io.resolve import ALIASES, BUILTIN

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
        from .io.resolve import ALIASES, builtin_gguf

        return builtin_gguf(ALIASES.get(spec.lower(), spec.lower()))
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
