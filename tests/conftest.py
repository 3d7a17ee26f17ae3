"""Tiny random models of every supported family, built in-process from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

VOCAB = 96


def tiny_config(family: str):
    from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return LlamaConfig(**common, head_dim=8)
    if family == "mistral":
        return MistralConfig(**common, head_dim=8, sliding_window=16)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=8, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"])
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=3, n_head=4, n_positions=64)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    # Random init is near-degenerate (tiny std); widen the weights so every unit matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 / p.shape[-1] ** 0.5 * 4)
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def windows(n: int = 8, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


TINY_WORDS = [f"w{i}" for i in range(90)]


def save_tiny_folder(folder) -> None:
    """A tiny Llama checkpoint with a word-level tokenizer over TINY_WORDS, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>"] + TINY_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)


def spy_stream_tokens(monkeypatch, module, name: str, stream_arg: int) -> list[int]:
    """Replace `module.name` by a wrapper that records how many tokens its positional argument
    `stream_arg` (a LayerStream) holds at each call; returns the list it appends to."""
    seen: list[int] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(sum(x.shape[0] * x.shape[1] for x in args[stream_arg]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen
