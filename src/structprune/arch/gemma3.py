"""Gemma 3 text models (gemma3_text): GQA with q/k norms, gated GELU MLP, sandwich norms."""

from __future__ import annotations

from torch import nn

from .base import register
from .llama import LlamaAdapter


@register
class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)
    gated = True

    def mlp_activation(self) -> str:
        return str(self.config.hidden_activation)

    def mlp_adds_to_residual(self) -> bool:
        return False  # post_feedforward_layernorm sits between down_proj and the residual add

    def branch_norm(self, layer: nn.Module, kind: str) -> nn.Module | None:
        return layer.post_attention_layernorm if kind == "attn" else layer.post_feedforward_layernorm
