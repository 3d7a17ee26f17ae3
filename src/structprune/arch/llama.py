"""Llama family: llama, mistral, qwen2, qwen3 (grouped-query attention, gated SiLU MLP)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LayerShape, add_zero_bias, register

# Config switches that give biases to whole module groups, per model type.
_BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias",),
                  "gemma3_text": ("attention_bias",)}


@register
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
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

    def vanilla_fields(self, shape: LayerShape) -> dict[str, int] | None:
        return {
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "intermediate_size": shape.intermediate_size,
            "head_dim": self.head_dim,
        }
