"""OPT: multi-head attention with biases, ReLU fc1 -> fc2 MLP on the decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LayerShape, register


@register
class OPTAdapter(Adapter):
    model_types = ("opt",)
    gated = False

    @property
    def intermediate_size(self) -> int:
        return int(self.config.ffn_dim)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def q_k_v(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj

    def o_proj(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.out_proj

    def mlp_producers(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.fc1]

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.fc2

    def mlp_adds_to_residual(self) -> bool:
        return bool(self.config.do_layer_norm_before)  # OPT-350m normalises after the residual add

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        dec = model.model.decoder
        if getattr(dec, "final_layer_norm", None) is not None:
            hidden = dec.final_layer_norm(hidden)
        if getattr(dec, "project_out", None) is not None:
            hidden = dec.project_out(hidden)
        return model.lm_head(hidden)

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        layer.self_attn.num_heads = num_heads

    def vanilla_fields(self, shape: LayerShape) -> dict[str, int] | None:
        # OPT derives head_dim = hidden_size / num_attention_heads: pruned heads are not expressible.
        if shape.num_heads != self.num_heads:
            return None
        return {"ffn_dim": shape.intermediate_size}
