"""Llama family: llama, mistral, qwen2, qwen3 (grouped-query attention, gated SiLU MLP)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, GGUFTensor, LayerShape, add_zero_bias, register

# Config switches that give biases to whole module groups, per model type.
_BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias",),
                  "gemma3_text": ("attention_bias",)}

# llama.cpp: per-layer shapes run only in 'deci', the one architecture that builds every layer with
# its own sizes (the Llama block; it applies q/k/v/o and MLP biases when present). Uniform llama and
# mistral models keep llama.cpp's 'llama' architecture; qwen2 always goes to 'deci' (llama.cpp's
# 'qwen2' assumes heads x head size = hidden size and has no output or MLP biases). Both use NORM
# RoPE (adjacent pairs): q/k rows are reordered on export.
_GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": None}
_GGUF_PER_LAYER = "deci"
# What llama.cpp's Llama-block architectures lack for the other families of this adapter.
_GGUF_MISSING = {"qwen3": "per-head Q/K RMS norms (q_norm, k_norm)",
                 "gemma3_text": "sandwich norms, the GELU MLP, sliding-window layers and embedding scaling"}


@register
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layer_attribute_names = ("attention_type", "layer_type", "is_sliding")  # sliding-window layers (Mistral, Gemma)
    gated = True

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def q_k_v(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj

    def o_proj(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.o_proj

    def mlp_producers(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj

    def compensation_fields(self) -> dict[str, bool]:
        switches = _BIAS_SWITCHES.get(self.config.model_type, ())
        return {f: True for f in switches if not getattr(self.config, f, False)}

    def add_zero_biases(self, layer: nn.Module, fields: dict[str, bool]) -> None:
        if fields.get("attention_bias"):
            for m in (*self.q_k_v(layer), self.o_proj(layer)):
                add_zero_bias(m)
        if fields.get("mlp_bias"):
            for m in (*self.mlp_producers(layer), self.down_proj(layer)):
                add_zero_bias(m)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = model.lm_head(model.model.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return out if not cap else torch.tanh(out / cap) * cap

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        # The forward reshapes with -1 heads; only the GQA repeat factor is read per layer.
        layer.self_attn.num_key_value_groups = num_heads // num_kv_heads

    # --- llama.cpp (GGUF) export --------------------------------------------------------------
    def gguf_arch(self, shapes: list[LayerShape]) -> str:
        mt = self.config.model_type
        if mt not in _GGUF_FAMILIES:
            raise NotImplementedError(
                f"GGUF export of model_type={mt!r} is not supported: llama.cpp runs per-layer head and FFN counts "
                f"only in its 'deci' architecture (the Llama block), which has no {_GGUF_MISSING.get(mt, 'support')}; "
                "a native-architecture writer for this family is not implemented")
        if self.mlp_activation() != "silu":
            raise NotImplementedError(f"GGUF export needs a SwiGLU MLP; {mt} uses {self.mlp_activation()!r}")
        uniform = len(set(shapes)) == 1 and shapes[0].num_heads > 0
        return _GGUF_FAMILIES[mt] if uniform and _GGUF_FAMILIES[mt] else _GGUF_PER_LAYER

    def gguf_hparams(self) -> dict:
        cfg = self.config
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise NotImplementedError(f"GGUF export: rope type {kind!r} is not supported (default and linear are)")
        ctx = int(cfg.max_position_embeddings)
        window = getattr(cfg, "sliding_window", None)
        if window and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
            # llama.cpp's Llama block has no sliding window: exact only up to the window
            ctx = min(ctx, int(window))
        return {"rope_theta": float(theta), "rms_eps": float(cfg.rms_norm_eps), "context_length": ctx,
                "rope_scaling": ("linear", float(rope["factor"])) if kind == "linear" else None}

    def gguf_tensors(self, model: nn.Module, arch: str, attention_free: set[int]):
        hd = self.head_dim  # every architecture written here uses NORM RoPE
        yield GGUFTensor("token_embd.weight", model.model.embed_tokens.weight)
        for i, layer in enumerate(self.decoder_layers(model)):
            blk = f"blk.{i}"
            if i not in attention_free:
                yield GGUFTensor(f"{blk}.attn_norm.weight", layer.input_layernorm.weight)
                for short, mod in zip(("q", "k", "v"), self.q_k_v(layer)):
                    heads = mod.weight.shape[0] // hd if short != "v" else 0
                    yield GGUFTensor(f"{blk}.attn_{short}.weight", mod.weight, heads)
                    if mod.bias is not None:
                        yield GGUFTensor(f"{blk}.attn_{short}.bias", mod.bias, heads)
                o = self.o_proj(layer)
                yield GGUFTensor(f"{blk}.attn_output.weight", o.weight)
                if o.bias is not None:
                    yield GGUFTensor(f"{blk}.attn_output.bias", o.bias)
            yield GGUFTensor(f"{blk}.ffn_norm.weight", layer.post_attention_layernorm.weight)
            for short, mod in zip(("gate", "up", "down"), (*self.mlp_producers(layer), self.down_proj(layer))):
                yield GGUFTensor(f"{blk}.ffn_{short}.weight", mod.weight)
                if mod.bias is not None:
                    yield GGUFTensor(f"{blk}.ffn_{short}.bias", mod.bias)
        yield GGUFTensor("output_norm.weight", model.model.norm.weight)
        if not getattr(self.config, "tie_word_embeddings", False):
            yield GGUFTensor("output.weight", model.lm_head.weight)

    def vanilla_fields(self, shape: LayerShape) -> dict[str, int] | None:
        return {
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "intermediate_size": shape.intermediate_size,
            "head_dim": self.head_dim,
        }
