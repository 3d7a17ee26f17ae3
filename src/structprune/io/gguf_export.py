"""Export a model (dense or pruned, any per-layer shapes) as a GGUF file that stock llama.cpp runs.

Stock llama.cpp builds every layer with its own FFN, query-head and KV-head counts only in its
`deci` architecture (the Llama block: RMSNorm, RoPE, SwiGLU, optional biases), so pruned models
of the llama, mistral and qwen2 families are written as `deci` with per-layer arrays; uniform
llama and mistral models keep llama.cpp's `llama` architecture. The adapter (`arch/`) names the
tensors and says which rows carry RoPE; this module writes the header, reorders q/k rows for
llama.cpp's interleaved RoPE, converts the dtype and quantizes.

Exact per-layer sizes are written (the stock converter rounds FFN sizes up to multiples of 256).
The head size is written explicitly (`attention.key_length`), since llama.cpp otherwise derives
it from layer 0's head count. A layer whose attention output projection is exactly zero adds
nothing to the residual stream and is written attention-free (zero heads: no KV cache, no
attention compute). A zero FFN width is not written as 0: in `deci` that also drops the layer's
attention output; structprune always keeps at least one neuron.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..arch import LayerShape, get_adapter

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


@dataclass
class ExportReport:
    """What `export_gguf` wrote."""

    path: str
    arch: str
    dtype: str
    layers: list[dict[str, int]]
    attention_free: list[int]
    tokenizer: str
    quantizer: str | None = None
    fallback: dict[str, str] = field(default_factory=dict)  # tensor -> type, where q8_0 was not possible
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interleave_rope_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of `n_heads` heads from transformers' rotate-half layout (each head's
    first half pairs with its second half) to llama.cpp's NORM RoPE layout (adjacent pairs).
    Applying it to both q and k leaves every attention score unchanged. t: [n_heads * d, ...]."""
    if t.shape[0] % n_heads or (t.shape[0] // n_heads) % 2:
        raise ValueError(f"cannot split {t.shape[0]} rows into {n_heads} heads of even size")
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def attention_free_layers(model: nn.Module) -> set[int]:
    """Layers whose attention output projection (weight and bias) is exactly zero."""
    adapter = get_adapter(model.config)
    free = set()
    for i, layer in enumerate(adapter.decoder_layers(model)):
        o = adapter.o_proj(layer)
        bias = getattr(o, "bias", None)
        if not bool(o.weight.detach().any()) and (bias is None or not bool(bias.detach().any())):
            free.add(i)
    return free


def _tensor_array(t: torch.Tensor, rope_heads: int, dtype: str) -> np.ndarray:
    x = t.detach().to(torch.float32).cpu()
    if rope_heads:
        x = interleave_rope_rows(x, rope_heads)
    arr = x.contiguous().numpy()
    # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type
    return arr.astype(np.float16) if dtype == "f16" and arr.ndim == 2 else arr


def _write(model: nn.Module, tokenizer: Any, path: Path, dtype: str, tokenizer_from: str | Path | None,
           tokenizer_pre: str, name: str) -> ExportReport:
    import gguf

    from .gguf_vocab import copy_tokenizer, tokenizer_from_transformers

    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    free = attention_free_layers(model)
    shapes = [LayerShape(0, 0, s.intermediate_size) if i in free else s
              for i, s in enumerate(adapter.layer_shape(layer) for layer in layers)]
    arch = adapter.gguf_arch(shapes)
    hp = adapter.gguf_hparams()
    hd = adapter.head_dim
    n_vocab = int(model.get_input_embeddings().weight.shape[0])

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[dtype])
    w.add_block_count(len(shapes))
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(adapter.hidden_size)
    if len(set(shapes)) == 1 and not free:
        w.add_feed_forward_length(shapes[0].intermediate_size)
        w.add_head_count(shapes[0].num_heads)
        w.add_head_count_kv(shapes[0].num_kv_heads)
    else:  # per-layer arrays of Python ints (the writer rejects numpy ints)
        w.add_feed_forward_length([int(s.intermediate_size) for s in shapes])
        w.add_head_count([int(s.num_heads) for s in shapes])
        w.add_head_count_kv([int(s.num_kv_heads) for s in shapes])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(hp["rope_theta"])
    if hp["rope_scaling"] is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp["rope_scaling"][1])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_vocab_size(n_vocab)
    if tokenizer_from is not None:
        tok_desc = copy_tokenizer(w, tokenizer_from, n_vocab)
    elif tokenizer is not None:
        tok_desc = tokenizer_from_transformers(w, tokenizer, n_vocab, pre=tokenizer_pre)
    else:
        raise ValueError("GGUF export needs a tokenizer: the model folder has none; pass --tokenizer-from FILE.gguf")
    for t in adapter.gguf_tensors(model, arch, free):
        w.add_tensor(t.name, _tensor_array(t.tensor, t.rope_heads, dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ExportReport(str(path), arch, dtype, [s.to_dict() for s in shapes], sorted(free), tok_desc)


def _quantize_q8_0(src: Path, dst: Path) -> str:
    """Quantize an F32 GGUF to Q8_0 with llama.cpp's own quantizer when llama-cpp-python is
    installed (tensors whose rows are not a multiple of 32 fall back to F16 there), else with
    the gguf package's Q8_0 under the same fallback rule; returns which was used."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = max(1, min(4, os.cpu_count() or 1))
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed on {src} (return code {rc})")
        return "llama.cpp llama_model_quantize"
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = _FILE_TYPE["q8_0"] if name == "general.file_type" else f.contents()
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in reader.tensors:
        arr = np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])
        if arr.ndim == 2 and arr.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(t.name, q, raw_shape=arr.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, arr.astype(np.float16) if arr.ndim == 2 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return "gguf (python) Q8_0"


def tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name of a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def export_gguf(model: nn.Module, tokenizer: Any, out: str | Path, dtype: str = "f32",
                tokenizer_from: str | Path | None = None, tokenizer_pre: str = "default",
                name: str = "structprune", overwrite: bool = False) -> ExportReport:
    """Write `model` (transformers, any per-layer shapes) to the GGUF file `out` in `dtype`
    (f32, f16 or q8_0). Tokenizer: the `tokenizer.*` keys of the GGUF `tokenizer_from` when given,
    else built from `tokenizer` (byte-level BPE). The file appears only when complete."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid for GGUF export: choose one of {list(GGUF_DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    f32_tmp = tmp.with_suffix(".f32.tmp")
    try:
        if dtype == "q8_0":
            report = _write(model, tokenizer, f32_tmp, "f32", tokenizer_from, tokenizer_pre, name)
            report.quantizer = _quantize_q8_0(f32_tmp, tmp)
            report.dtype = "q8_0"
            types = tensor_types(tmp)
            report.fallback = {n: t for n, t in types.items() if t not in ("Q8_0", "F32") or
                               (t == "F32" and not n.endswith(("norm.weight", ".bias")))}
            if report.fallback:
                log.info("Q8_0: %d tensor(s) kept in another type (rows not a multiple of 32): %s",
                         len(report.fallback), ", ".join(sorted(report.fallback)[:6]))
        else:
            report = _write(model, tokenizer, tmp, dtype, tokenizer_from, tokenizer_pre, name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        f32_tmp.unlink(missing_ok=True)
    report.path = str(out)
    report.size_bytes = out.stat().st_size
    log.info("wrote %s (%s, %s, %.1f MB)", out, report.arch, report.dtype, report.size_bytes / 1e6)
    return report


def export_model(spec: str, out: str | Path, dtype: str = "f32", tokenizer_from: str | Path | None = None,
                 tokenizer_pre: str = "default", overwrite: bool = False) -> ExportReport:
    """Load MODEL (a structprune folder, HF folder, .gguf file or built-in name) in float32 and
    export it; a GGUF source (file or built-in) also provides the tokenizer unless one is given."""
    from .resolve import ALIASES, BUILTIN, builtin_gguf, load_model

    if dtype not in GGUF_DTYPES:  # fail before loading any weight
        raise ValueError(f"dtype={dtype!r} is invalid for GGUF export: choose one of {list(GGUF_DTYPES)}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; choose another --out or pass --overwrite")
    key = ALIASES.get(spec.lower(), spec.lower())
    if tokenizer_from is None:
        if key in BUILTIN:
            tokenizer_from = builtin_gguf(key)
        elif spec.endswith(".gguf"):
            tokenizer_from = spec
    model, tok = load_model(spec, dtype="float32")
    return export_gguf(model, tok, out, dtype=dtype, tokenizer_from=tokenizer_from, tokenizer_pre=tokenizer_pre,
                       name=Path(str(spec).rstrip("/")).name, overwrite=overwrite)
