"""Tokenizer metadata for a GGUF file: copied from a source GGUF, or built from a transformers
byte-level BPE tokenizer (llama.cpp's "gpt2" tokenizer model).

llama.cpp reads `tokenizer.ggml.model`, `.tokens` (id order), `.token_type`, `.merges` ("a b"
strings, required for "gpt2" even when empty), `.pre` (its pre-tokenizer regex set by name),
the special ids and `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def copy_tokenizer(writer: Any, source: str | Path, n_vocab: int) -> str:
    """Copy every `tokenizer.*` key of the GGUF file `source` into `writer`; returns a description."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = {name: f for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens; it cannot provide a tokenizer")
    n_tokens = len(fields["tokenizer.ggml.tokens"].data)
    if n_tokens > n_vocab:
        raise ValueError(f"the tokenizer of {source} has {n_tokens} tokens but the model's embedding has {n_vocab} rows")
    for name, f in fields.items():
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub_type=sub)
    return f"copied from {Path(source).name} ({n_tokens} tokens)"


def tokenizer_from_transformers(writer: Any, tok: Any, n_vocab: int, pre: str = "default") -> str:
    """Write a byte-level BPE tokenizer (transformers, with a `tokenizers` backend) as llama.cpp's
    "gpt2" model; token ids beyond the tokenizer up to `n_vocab` become unused pad tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tok).__name__}. "
                                  "Pass --tokenizer-from with a GGUF file of the source model")
    data = json.loads(backend.to_str())
    model = data["model"]
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise NotImplementedError(
            f"GGUF export writes byte-level BPE tokenizers only (llama.cpp 'gpt2'); this one is "
            f"{model.get('type')} with decoder {(data.get('decoder') or {}).get('type')}. "
            "Pass --tokenizer-from with a GGUF file of the source model")
    texts: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: NORMAL for i in texts}
    for added in data.get("added_tokens") or []:
        texts[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    n_tok = max(texts) + 1
    if n_tok > n_vocab:
        raise ValueError(f"the tokenizer has {n_tok} tokens but the model's embedding has {n_vocab} rows")
    tokens, token_types = [], []
    for i in range(n_vocab):
        if i in texts:
            tokens.append(texts[i])
            token_types.append(types[i])
        else:  # a hole or padding of the embedding: llama.cpp needs a token per row
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:  # llama.cpp's "gpt2" model requires the merges key; GGUF cannot store an empty array
        raise NotImplementedError("the tokenizer has no BPE merges, which a GGUF 'gpt2' tokenizer needs; "
                                  "pass --tokenizer-from with a GGUF file of the source model")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    writer.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    if pre == "default":
        log.warning("GGUF tokenizer: pre-tokenizer 'default' (llama.cpp's GPT-2 regex); text tokenization in "
                    "llama.cpp may differ from transformers. Pass --tokenizer-from a GGUF of the source model to "
                    "carry its tokenizer over exactly")
    return f"built from the transformers tokenizer ({n_tok} tokens, {len(merges)} merges, pre '{pre}')"
