"""GPT-2: fused Conv1D c_attn (q | k | v), GELU c_fc -> c_proj MLP; weights stored [in, out]."""

from __future__ import annotations

import torch
from torch import nn

from ..surgery import TransposedKind, register_transposed, slice_rows
from .base import Adapter, LayerShape, register


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D: weight [in, out], attribute nf = out features."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _set_nf(module: nn.Module, out_features: int) -> None:
    module.nf = out_features


CONV1D = register_transposed(TransposedKind(matches=is_conv1d, set_out_features=_set_nf))


@register
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    gated = False
    fused_qkv = True  # c_attn

    @property
    def num_layers(self) -> int:
        return int(self.config.n_layer)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.n_inner or 4 * self.hidden_size)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def q_k_v(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        # One fused module; callers that need sizes use layer_shape, which is overridden.
        c = layer.attn.c_attn
        return c, c, c

    def linear_weights(self, layer: nn.Module) -> list[torch.Tensor]:
        from ..surgery import get_weight

        mods = [layer.attn.c_attn, layer.attn.c_proj, layer.mlp.c_fc, layer.mlp.c_proj]
        return [get_weight(m) for m in mods]

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        heads = layer.attn.c_proj.weight.shape[0] // self.head_dim
        return LayerShape(heads, heads, layer.mlp.c_proj.weight.shape[0])

    def _slice_qkv_rows(self, layer: nn.Module, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> None:
        width = layer.attn.c_proj.weight.shape[0]  # current q (= k = v) width
        idx = torch.cat([q_idx, kv_idx + width, kv_idx + 2 * width])
        slice_rows(layer.attn.c_attn, idx, "c_attn")

    def o_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def mlp_producers(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.mlp.c_fc]

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def mlp_activation(self) -> str:
        return str(self.config.activation_function)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.transformer.ln_f(hidden))

    def timed_body(self, model: nn.Module) -> nn.Module:
        # the whole model, head included: what the quality harness has always timed for GPT-2
        return model

    def set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        layer.attn.num_heads = num_heads
        layer.attn.split_size = num_heads * self.head_dim

    def vanilla_fields(self, shape: LayerShape) -> dict[str, int] | None:
        # GPT-2 derives head_dim = n_embd / n_head: pruned heads are not expressible.
        if shape.num_heads != self.num_heads:
            return None
        return {"n_inner": shape.intermediate_size}
