"""Random-weight checkpoints with the exact shapes of the published OPT models, written to disk
shard by shard (the whole model is never materialised: shapes come from a meta-device build).

    write_checkpoint(opt_config("1.3b"), folder)   # model-0000i-of-0000n.safetensors + index + config.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# The published facebook/opt-* configs (hidden, layers, heads); ffn = 4 * hidden everywhere.
OPT_SIZES: dict[str, dict] = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 word_embed_proj_dim=512, do_layer_norm_before=False),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40),
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MARKER = ".random-checkpoint.json"
DTYPE_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def opt_config(size: str, **overrides):
    """The OPTConfig of a published size (or a custom one through `overrides`)."""
    from transformers import OPTConfig

    if size not in OPT_SIZES and not overrides:
        raise ValueError(f"size={size!r} is unknown; choose one of {sorted(OPT_SIZES)}")
    fields = dict(vocab_size=50272, max_position_embeddings=2048, **OPT_SIZES.get(size, {}))
    fields.update(overrides)
    fields.setdefault("ffn_dim", 4 * fields["hidden_size"])
    fields.setdefault("word_embed_proj_dim", fields["hidden_size"])
    return OPTConfig(**fields)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `config` stores, tied tensors once, in
    state-dict order. Built on the meta device: no weight memory is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    specs = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied (lm_head -> embed_tokens)
            continue
        seen.add(id(t))
        specs.append((name, tuple(t.shape)))
    return specs


def count_params(specs: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(int(torch.Size(s).numel()) for _, s in specs)


def layer_params(specs: list[tuple[str, tuple[int, ...]]]) -> int:
    """Parameters of decoder layer 0 (all layers have the same shape)."""
    return sum(int(torch.Size(s).numel()) for n, s in specs if ".layers.0." in n)


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, shard_bytes: int) -> list[list[int]]:
    """Greedy grouping of tensors (in order, never split) into shards of at most `shard_bytes`
    (a larger tensor gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(specs):
        nbytes = int(torch.Size(shape).numel()) * DTYPE_BYTES[dtype]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, std) (OPT's init), seeded by name."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(digest)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def _fingerprint(config, dtype: torch.dtype, seed: int) -> str:
    body = json.dumps([config.to_dict(), str(dtype), seed], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def is_complete(folder: Path, config, dtype: torch.dtype = torch.float16, seed: int = 0) -> bool:
    """True when `folder` holds a finished checkpoint of exactly this config, dtype and seed."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("fingerprint") == _fingerprint(config, dtype, seed)


def write_checkpoint(config, folder: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0,
                     shard_bytes: int = 2 << 30, tokenizer_dir: str | Path | None = None) -> dict:
    """Write a random-weight checkpoint of `config` to `folder`, one shard in memory at a time.

    More than one shard: model-0000i-of-0000n.safetensors plus model.safetensors.index.json;
    one shard: model.safetensors. Also config.json, the tokenizer files from `tokenizer_dir`
    (when given) and a marker that `is_complete` checks (written last). Returns a summary."""
    import copy

    fingerprint = _fingerprint(config, dtype, seed)
    config = copy.deepcopy(config)
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    specs = tensor_specs(config)
    shards = plan_shards(specs, dtype, shard_bytes)
    std = float(getattr(config, "init_std", 0.02))
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    for file, members in zip(names, shards):
        tensors = {specs[i][0]: _random_tensor(specs[i][0], specs[i][1], dtype, std, seed) for i in members}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=1))
    config.dtype = dtype
    config.save_pretrained(folder)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    params = count_params(specs)
    summary = {"params": params, "layer_params": layer_params(specs), "bytes": total, "shards": len(shards),
               "dtype": str(dtype).removeprefix("torch."), "seed": seed,
               "fingerprint": fingerprint}
    (folder / MARKER).write_text(json.dumps(summary, indent=1))
    return summary
