"""GGUF export of the real default model (SmolLM2-135M) with per-layer shapes, run in stock
llama.cpp: same logits as transformers (float32) and the same tokenizer as the source GGUF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from structprune.arch import get_adapter
from structprune.io.gguf_export import export_gguf, tensor_types
from structprune.io.resolve import builtin_gguf, load_model

pytestmark = pytest.mark.slow


def test_smollm2_per_layer_shapes_in_llamacpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    try:
        source = builtin_gguf("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load_model("smollm2-135m")
    adapter = get_adapter(model.config)
    for i, layer in enumerate(adapter.decoder_layers(model)):  # 9 q / 3 kv heads, 1536 neurons dense
        kv = [j for j in range(3) if j != i % 3] if i % 2 else [0, 1, 2]
        q = [h for g in kv for h in range(3 * g, 3 * g + 1 + (i % 3))]
        adapter.slice_heads(layer, torch.tensor(q), torch.tensor(kv))
        adapter.slice_neurons(layer, torch.arange(0, 1536 - 37 * i))
    out = tmp_path / "smollm2-pruned.gguf"
    report = export_gguf(model, tok, out, dtype="f32", tokenizer_from=source)
    assert report.arch == "deci" and len(set(map(str, report.layers))) > 1
    assert tensor_types(out)["blk.29.ffn_down.weight"] == "F32"
    text = "The capital of France is Paris, and the Eiffel Tower stands"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=2,
                          n_threads_batch=2, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    err = float(np.abs(got - ref).max())
    assert err < 1e-2 * float(np.abs(ref).max()), f"max |logit difference| {err:.3e}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
