"""benchmarks/memory.py helpers: the random checkpoint writer, the slope / table / plot code (memory_report.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import memory  # noqa: E402
import memory_report  # noqa: E402
import opt_shapes  # noqa: E402


def _tiny(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=96,
                max_position_embeddings=64)
    base.update(kw)
    return opt_shapes.opt_config("tiny", **base)


@pytest.mark.parametrize("extra", [{}, {"word_embed_proj_dim": 16, "do_layer_norm_before": False}])
def test_sharded_checkpoint_loads_with_transformers(tmp_path, monkeypatch, extra):
    from transformers import AutoModelForCausalLM

    cfg = _tiny(**extra)
    # the writer must never build the model with real weights
    real = AutoModelForCausalLM.from_config

    def guarded(config, **kw):
        assert torch.get_default_device().type == "meta", "writer built a model outside the meta device"
        return real(config, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", guarded)
    summary = opt_shapes.write_checkpoint(cfg, tmp_path / "ckpt", shard_bytes=4096)
    monkeypatch.undo()
    folder = tmp_path / "ckpt"
    assert summary["shards"] > 1
    index = json.loads((folder / opt_shapes.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == summary["shards"]
    assert opt_shapes.is_complete(folder, cfg)
    assert not opt_shapes.is_complete(folder, _tiny(ffn_dim=32))

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_config(cfg)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    w = model.model.decoder.layers[0].fc1.weight.detach()
    assert 0.01 < float(w.std()) < 0.03 and model.config.ffn_dim == 64
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        out = model(input_ids=torch.arange(10)[None]).logits
    assert torch.isfinite(out).all()


def test_published_shapes_parameter_counts():
    """Meta-device shapes reproduce the published OPT parameter counts."""
    params = {s: opt_shapes.count_params(opt_shapes.tensor_specs(opt_shapes.opt_config(s))) for s in ("125m", "350m")}
    assert abs(params["125m"] - 125.2e6) < 0.1e6
    assert abs(params["350m"] - 331.2e6) < 0.1e6
    one = opt_shapes.layer_params(opt_shapes.tensor_specs(opt_shapes.opt_config("125m")))
    assert one == 12 * 768 * 768 + 4 * 768 + 3072 + 768 + 2 * 2 * 768  # q k v o fc1 fc2, their biases, 2 norms


def test_plan_shards_never_split_and_respect_the_limit():
    specs = [("a", (10,)), ("b", (100,)), ("c", (5,)), ("d", (3,))]
    shards = opt_shapes.plan_shards(specs, torch.float16, shard_bytes=40)
    assert shards == [[0], [1], [2, 3]]


def _rows(method, params, peaks, status="ok"):
    return [{"size": f"{p:g}", "params": p, "model_bytes": 2 * p, "layer_bytes": 2 * p // 10, "method": method,
             "host_peak_rss_bytes": m, "cuda_peak_bytes": None if m is None else m / 2, "seconds": 1.0,
             "reference_seconds": 0.5, "actual_sparsity": 0.3, "status": status} for p, m in zip(params, peaks)]


def test_slopes_table_and_plot_on_synthetic_numbers(tmp_path):
    params = [1e8, 4e8, 1.6e9, 6.4e9]
    rows = _rows("global", params, [3 * p for p in params])
    rows += _rows("structprune", params, [1e6 * math.sqrt(p) for p in params])
    rows += _rows("structprune", [1e10], [None], status="skipped: too big")
    fitted = memory_report.slopes(rows)
    assert fitted["global"]["host"] == pytest.approx(1.0)
    assert fitted["structprune"]["host"] == pytest.approx(0.5)
    assert fitted["structprune"]["cuda"] == pytest.approx(0.5)
    assert memory_report.fit_slope([1e8], [1.0]) is None
    assert memory_report.fit_slope([1e8, 2e8], [1.0, None]) is None

    table = memory_report.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "skipped: too big" in table[-1] and "n/a" in table[-1]
    assert "| 2.0 |" in table[2]  # time / dense forward

    png = tmp_path / "m.png"
    memory_report.plot(rows, fitted, png, "synthetic")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_parse_peaks_and_host_need():
    text = "model x\nhost_peak_rss_bytes=123\ncuda_peak_bytes=45\n"
    assert memory.parse_int(text, "host_peak_rss_bytes") == 123
    assert memory.parse_int(text, "cuda_peak_bytes") == 45
    assert memory.parse_int("nothing", "cuda_peak_bytes") is None
    done = [{"method": "global", "status": "ok", "model_bytes": 1e9, "host_peak_rss_bytes": 3e9},
            {"method": "global", "status": "ok", "model_bytes": 2e9, "host_peak_rss_bytes": 5e9}]
    assert memory.host_need("global", 4e9, done) == pytest.approx(1.1 * 9e9)
    assert memory.host_need("structprune", 4e9, done) == pytest.approx(memory.HOST_FACTOR["structprune"] * 4e9
                                                                         + memory.GIB)
