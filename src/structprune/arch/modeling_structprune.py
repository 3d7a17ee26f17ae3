"""Load a structprune output folder whose decoder layers have different shapes, with transformers only.

structprune copies this file into every output folder whose per-layer shapes a plain config cannot
express, and points `auto_map` in config.json at it, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

rebuilds the pruned model without structprune installed. This file is self-contained: it imports
only torch and transformers (do not add other imports; it runs where structprune is absent).

config.json is the family's own dense config plus a `structprune` section whose `layers` list gives
every decoder layer's kept query heads, key/value heads and FFN neurons. Each class below is the
family's own transformers model; after building the dense skeleton (on the meta device while
`from_pretrained` runs) it shrinks each layer's projections to that layer's shape, and then
transformers loads the pruned weights into them as usual.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

SHAPES_VERSION = 1


def layer_shapes(config: Any, num_layers: int) -> list[tuple[int, int, int]]:
    """(query heads, key/value heads, FFN neurons) of every decoder layer, from config.structprune."""
    meta = getattr(config, "structprune", None)
    if not isinstance(meta, dict) or "layers" not in meta:
        raise ValueError("config.json has no 'structprune' section with per-layer shapes; "
                         "this folder was not written by structprune")
    if int(meta.get("version", 0)) != SHAPES_VERSION:
        raise ValueError(f"structprune shapes version {meta.get('version')!r} is not supported by this "
                         f"modeling file (expects {SHAPES_VERSION})")
    shapes = [(int(s["num_heads"]), int(s["num_kv_heads"]), int(s["intermediate_size"])) for s in meta["layers"]]
    if len(shapes) != num_layers:
        raise ValueError(f"config.structprune lists {len(shapes)} layer shapes but the model has {num_layers} layers")
    for i, (heads, kv, ffn) in enumerate(shapes):
        if heads < 1 or kv < 1 or ffn < 1 or heads % kv:
            raise ValueError(f"layer {i}: invalid shape heads={heads}, kv_heads={kv}, ffn={ffn}")
    return shapes


def _shrink(module: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    """Keep the first `out` output and `inp` input features of a Linear (or GPT-2 Conv1D, whose
    weight is stored [in, out]). The values are placeholders: the checkpoint's weights replace them."""
    conv1d = hasattr(module, "nf") and not isinstance(module, nn.Linear)
    w = module.weight
    rows, cols = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
    rows, cols = out or rows, inp or cols
    new = w[:cols, :rows] if conv1d else w[:rows, :cols]
    module.weight = nn.Parameter(new.clone(), requires_grad=w.requires_grad)
    if conv1d:
        module.nf = rows
        if hasattr(module, "nx"):
            module.nx = cols
    else:
        module.out_features, module.in_features = rows, cols
    bias = getattr(module, "bias", None)
    if bias is not None and bias.shape[0] != rows:
        module.bias = nn.Parameter(bias[:rows].clone(), requires_grad=bias.requires_grad)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _reshape_llama_like(model: nn.Module) -> None:
    """llama, mistral, qwen2, qwen3, gemma3_text: q/k/v/o projections and a gated MLP."""
    layers = model.model.layers
    hd = _head_dim(model.config)
    for layer, (heads, kv, ffn) in zip(layers, layer_shapes(model.config, len(layers))):
        attn, mlp = layer.self_attn, layer.mlp
        _shrink(attn.q_proj, out=heads * hd)
        _shrink(attn.k_proj, out=kv * hd)
        _shrink(attn.v_proj, out=kv * hd)
        _shrink(attn.o_proj, inp=heads * hd)
        attn.num_key_value_groups = heads // kv  # the forward reshapes with -1 heads; only this is per layer
        _shrink(mlp.gate_proj, out=ffn)
        _shrink(mlp.up_proj, out=ffn)
        _shrink(mlp.down_proj, inp=ffn)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = ffn


def _reshape_opt(model: nn.Module) -> None:
    layers = model.model.decoder.layers
    hd = model.config.hidden_size // model.config.num_attention_heads
    for layer, (heads, _, ffn) in zip(layers, layer_shapes(model.config, len(layers))):
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            _shrink(proj, out=heads * hd)
        _shrink(attn.out_proj, inp=heads * hd)
        attn.num_heads = heads
        _shrink(layer.fc1, out=ffn)
        _shrink(layer.fc2, inp=ffn)


def _reshape_gpt2(model: nn.Module) -> None:
    layers = model.transformer.h
    hd = model.config.n_embd // model.config.n_head
    for layer, (heads, _, ffn) in zip(layers, layer_shapes(model.config, len(layers))):
        attn = layer.attn
        _shrink(attn.c_attn, out=3 * heads * hd)  # fused q | k | v
        _shrink(attn.c_proj, inp=heads * hd)
        attn.num_heads = heads
        attn.split_size = heads * hd
        _shrink(layer.mlp.c_fc, out=ffn)
        _shrink(layer.mlp.c_proj, inp=ffn)


class StructpruneLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_llama_like(self)


class StructpruneMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_llama_like(self)


class StructpruneQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_llama_like(self)


class StructpruneQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_llama_like(self)


class StructpruneGemma3ForCausalLM(Gemma3ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_llama_like(self)


class StructpruneOPTForCausalLM(OPTForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_opt(self)


class StructpruneGPT2LMHeadModel(GPT2LMHeadModel):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _reshape_gpt2(self)
