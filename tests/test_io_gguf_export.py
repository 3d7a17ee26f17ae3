"""GGUF export: tiny llama / mistral / qwen2 models with per-layer FFN, query-head and KV-head
counts (and an attention-free layer) run in stock llama.cpp (llama-cpp-python) with the same
logits as transformers, in float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import VOCAB, logits, tiny_model

from structprune.arch import LayerShape, get_adapter
from structprune.io.gguf_export import attention_free_layers, export_gguf, interleave_rope_rows, tensor_types

gguf = pytest.importorskip("gguf")

# transformers vs llama.cpp, float32 weights and KV cache: max |difference| of logits (values up to ~5;
# measured 1e-6 to 4e-6)
ATOL = 1e-4


def byte_bpe_tokenizer():
    """A real byte-level BPE tokenizer of exactly VOCAB (96) tokens: 93 printable ASCII bytes (no
    '~'), space and newline in GPT-2's byte-to-unicode spelling, and "ab" from one merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(b) for b in range(33, 126)] + ["\u0120", "\u010a", "ab"]  # 'Ġ' = space, 'Ċ' = newline
    assert len(chars) == VOCAB
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="^", eos_token="}")


# (kept KV heads, kept query heads grouped by them, FFN neurons kept) per layer; dense: 2 KV, 4 q, 48
PLAN = [([1], [2, 3], 20), ([0, 1], [0, 1, 2, 3], 33), ([0, 1], [0, 2], 7)]


def pruned_tiny(family: str, biases: bool = False, attention_free: int | None = None):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    g = torch.Generator().manual_seed(3)
    for layer, (kv, q, ff) in zip(adapter.decoder_layers(model), PLAN):
        if biases:  # what bias compensation adds (llama: attention_bias, mlp_bias), non-zero
            adapter.add_zero_biases(layer, {"attention_bias": True, "mlp_bias": True})
        adapter.slice_heads(layer, torch.tensor(q), torch.tensor(kv))
        adapter.slice_neurons(layer, torch.randperm(48, generator=g)[:ff].sort().values)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=g)
            elif "norm" in name:  # non-trivial norm weights
                p.uniform_(0.5, 1.5, generator=g)
        if attention_free is not None:
            o = adapter.o_proj(adapter.decoder_layers(model)[attention_free])
            o.weight.zero_()
            if o.bias is not None:
                o.bias.zero_()
    return model


def read_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def llamacpp_logits(path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=32, logits_all=True, type_k=0, type_v=0, n_threads=1,
                          n_threads_batch=1, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def test_interleave_rope_rows_pairs_halves():
    t = torch.arange(16.0).reshape(8, 2)  # 2 heads of 4 rows
    out = interleave_rope_rows(t, 2)
    assert out[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    with pytest.raises(ValueError, match="heads"):
        interleave_rope_rows(torch.zeros(6, 2), 4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_per_layer_shapes_match_transformers_in_llamacpp(family, tmp_path):
    model = pruned_tiny(family, biases=family == "llama")
    out = tmp_path / f"{family}.gguf"
    report = export_gguf(model, byte_bpe_tokenizer(), out, dtype="f32")
    assert report.arch == "deci"
    f = read_fields(out)
    assert f["general.architecture"] == "deci"
    assert list(f["deci.feed_forward_length"]) == [20, 33, 7]
    assert list(f["deci.attention.head_count"]) == [2, 4, 2]
    assert list(f["deci.attention.head_count_kv"]) == [1, 2, 2]
    assert f["deci.attention.key_length"] == 8
    ids = [5, 17, 3, 90, 44, 12, 60, 61, 2, 33, 71, 9]
    ref = logits(model, torch.tensor([ids]))[0].numpy()
    got = llamacpp_logits(out, ids)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    assert err < ATOL, f"{family}: max |logit difference| {err:.2e}"


def test_attention_free_layer_is_written_without_attention(tmp_path):
    model = pruned_tiny("llama", attention_free=1)
    assert attention_free_layers(model) == {1}
    out = tmp_path / "free.gguf"
    report = export_gguf(model, byte_bpe_tokenizer(), out)
    assert report.attention_free == [1]
    f = read_fields(out)
    assert list(f["deci.attention.head_count"]) == [2, 0, 2]
    assert list(f["deci.attention.head_count_kv"]) == [1, 0, 2]
    assert "blk.1.attn_q.weight" not in tensor_types(out)
    ids = list(range(3, 40, 3))
    err = float(np.abs(llamacpp_logits(out, ids) - logits(model, torch.tensor([ids]))[0].numpy()).max())
    assert err < ATOL


def test_uniform_llama_keeps_native_arch_and_tokenizer(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "dense.gguf"
    tok = byte_bpe_tokenizer()
    report = export_gguf(model, tok, out, dtype="f16")
    assert report.arch == "llama"
    f = read_fields(out)
    assert f["llama.feed_forward_length"] == 48 and f["llama.attention.head_count"] == 4
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert list(f["tokenizer.ggml.tokens"])[:3] == ["!", '"', "#"] and len(f["tokenizer.ggml.tokens"]) == VOCAB
    assert tensor_types(out)["blk.0.ffn_down.weight"] == "F16"
    assert tensor_types(out)["blk.0.attn_norm.weight"] == "F32"
    # llama.cpp tokenizes text with the exported vocabulary as transformers does
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(out), n_ctx=32, vocab_only=True, verbose=False)
    try:
        text = "ab c!\nxab"
        ids = tok(text)["input_ids"]
        assert VOCAB - 1 in ids  # the merge applied
        assert llm.tokenize(text.encode(), add_bos=False) == ids
    finally:
        llm.close()


def test_q8_0_reports_fallback_tensors(tmp_path):
    pytest.importorskip("llama_cpp")
    model = pruned_tiny("llama")
    out = tmp_path / "q8.gguf"
    report = export_gguf(model, byte_bpe_tokenizer(), out, dtype="q8_0")
    types = tensor_types(out)
    assert types["blk.0.ffn_gate.weight"] == "Q8_0"  # 32 input columns: quantized
    # ffn_down has 20 / 33 / 7 input columns: not a multiple of the 32-block, kept in F16 by llama.cpp
    assert {f"blk.{i}.ffn_down.weight" for i in range(3)} <= set(report.fallback)
    assert report.fallback["blk.0.ffn_down.weight"] == "F16"
    ids = [5, 17, 3, 90, 44, 12]
    ref = logits(model, torch.tensor([ids]))[0].numpy()
    err = float(np.abs(llamacpp_logits(out, ids) - ref).max())
    # 8-bit weights (and llama.cpp's 8-bit activations in Q8_0 products) on a tiny random model: close,
    # not exact (measured 0.13 of a logit range of 4.8)
    assert ATOL < err < 0.1 * float(np.abs(ref).max())


@pytest.mark.parametrize("family,what", [("qwen3", "Q/K RMS norms"), ("gemma3_text", "sandwich norms"),
                                         ("opt", "deci"), ("gpt2", "deci")])
def test_families_llamacpp_cannot_run_fail_clearly(family, what, tmp_path):
    model = tiny_model(family)
    with pytest.raises(NotImplementedError, match=what):
        export_gguf(model, byte_bpe_tokenizer(), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_export_refuses_existing_file_and_bad_dtype(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(tiny_model("llama"), byte_bpe_tokenizer(), out)
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(tiny_model("llama"), byte_bpe_tokenizer(), tmp_path / "n.gguf", dtype="q4")


def test_report_is_json(tmp_path):
    report = export_gguf(pruned_tiny("qwen2"), byte_bpe_tokenizer(), tmp_path / "q.gguf")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0] == LayerShape(2, 1, 20).to_dict()


def test_cli_prune_then_export_runs_in_llamacpp(tmp_path, capsys):
    from structprune.cli import main
    from structprune.io import load_pruned

    folder, out, gguf_file = tmp_path / "tiny", tmp_path / "pruned", tmp_path / "pruned.gguf"
    tiny_model("llama").save_pretrained(folder)
    byte_bpe_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(chr(33 + i) for i in torch.randint(0, 94, (4000,), generator=g).tolist()))
    assert main(["prune", str(folder), "--sparsity", "0.3", "--out", str(out), "--calib", str(calib), "--nsamples",
                 "8", "--seqlen", "32", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "gguf", "--out", str(gguf_file), "--dtype", "f32"]) == 0
    stdout = capsys.readouterr().out
    assert "llama.cpp architecture" in stdout and gguf_file.is_file()
    model = load_pruned(out)
    ids = [4, 8, 15, 16, 23, 42, 7, 1]
    err = float(np.abs(llamacpp_logits(gguf_file, ids) - logits(model, torch.tensor([ids]))[0].numpy()).max())
    assert err < ATOL
    # an existing file is refused with a clear error, nothing changed
    assert main(["export", str(out), "--out", str(gguf_file)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_export_word_level_tokenizer_fails_clearly(tmp_path, capsys):
    from conftest import save_tiny_folder

    from structprune.cli import main

    save_tiny_folder(tmp_path / "tiny")
    assert main(["export", str(tmp_path / "tiny"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "byte-level BPE" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
