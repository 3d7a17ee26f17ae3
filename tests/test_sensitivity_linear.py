"""sensitivity="linear": the L-linear, second-order estimate of the re-fit-aware sensitivities."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_folder, tiny_config, tiny_model, windows
from transformers import AutoModelForCausalLM

import structprune as sp
from structprune import allocation as A
from structprune.sensitivity import exact, linear
from structprune.arch import get_adapter
from structprune.allocation.budget import module_params
from structprune.runtime.hooks import calibration_mode
from structprune.runtime.stream import LayerStream

def model_text(model, n: int, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    """[n, seqlen] token windows sampled from `model` itself: on its own text the dense model is
    the best predictor there is (Gibbs), so every removal raises the expected loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(seqlen - 1):
            p = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def _measure(model, rule, keys, removed, n_calib=8, n_hold=4, batch=4, text=None):
    """(curves, dense held-back NLL, layer forwards, head calls) of one rule's measurement;
    text: (calibration, held-back) windows (default: random tokens)."""
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=n_calib, seqlen=24, batch_size=batch, device="cpu",
                         allocation="sensitivity")
    counts = {"layer": 0, "head": 0}

    def count(name):
        def hook(_m, _a):
            counts[name] += 1
        return hook

    handles = [l.register_forward_pre_hook(count("layer")) for l in layers]
    handles.append(model.get_output_embeddings().register_forward_pre_hook(count("head")))
    try:
        with calibration_mode(model):
            calib, hold_ids = text or (windows(n_calib), windows(n_hold, seed=2))
            stream = LayerStream.capture(model, layers, calib, batch)
            hold = LayerStream.capture(model, layers, hold_ids, batch)
            counts.update(layer=0, head=0)
            out = rule.measure(cfg, ad, model, lambda i: layers[i], stream, hold, hold_ids, keys, removed,
                               progress=False)
    finally:
        for h in handles:
            h.remove()
    return out[0], out[1], counts["layer"], counts["head"]


def test_taylor_terms():
    g = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    d = torch.tensor([[[2.0, 3.0], [2.0, -1.0]]])
    first, second = linear.taylor_terms(g, d)  # dots 2 and -1
    assert first == pytest.approx(1.0) and second == pytest.approx(0.5 * (4 + 1))
    assert linear.taylor_increase(first, second, 5) == pytest.approx(3.5 / 5)
    with pytest.raises(ValueError, match="same shape"):
        linear.taylor_terms(g, d[..., :1])
    with pytest.raises(ValueError, match="tokens"):
        linear.taylor_increase(1.0, 1.0, 0)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3_text"])
def test_streamed_backward_equals_autograd_through_the_whole_model(family):
    """grads[i][kind] (one layer at a time, head touched once) is the gradient of the summed
    held-back NLL with respect to what layer i's attention / MLP branch adds to the residual stream
    (o_proj / down_proj output; Gemma 3: the norm after each), as autograd through the whole model
    gives it."""
    model = tiny_model(family)
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    ids = windows(4, seed=2)
    kinds_at = {i: ["attn", "mlp"] for i in range(len(layers))}
    kinds_at[1] = ["mlp"]  # a layer measured for one kind only keeps that one
    with calibration_mode(model):
        hold = LayerStream.capture(model, layers, ids, 2)
        grads, nll, tokens = linear.output_gradients(ad, model, lambda i: layers[i], hold, ids, kinds_at,
                                                     progress=False)
    outs = {}

    def keep(key):
        def hook(_m, _a, out):
            out.retain_grad()
            outs[key] = out
        return hook

    handles = [linear._branch(ad, l, k).register_forward_hook(keep((i, k))) for i, l in enumerate(layers)
               for k in ("attn", "mlp")]
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    assert tokens == ids[:, 1:].numel() and nll == pytest.approx(float(loss.detach()), rel=1e-5)
    assert sorted(grads[1]) == ["mlp"]
    for i in range(len(layers)):
        for kind in kinds_at[i]:
            got = torch.cat(grads[i][kind])
            assert torch.allclose(got, outs[(i, kind)].grad, rtol=1e-4, atol=1e-6), (i, kind)
            assert got.abs().max() > 0


def test_linear_estimate_ranks_modules_like_the_exact_rule():
    """Layer 1's MLP nearly dead, text drawn from the model itself: at every fraction the estimate
    orders the modules as the exact rule measures them, the dead one about free, the most costly
    one (0.05 nat and more at 30%: costly on this text) last, within 25% of its measure."""
    model = tiny_model("llama")
    ad = get_adapter(model.config)
    layers = ad.decoder_layers(model)
    with torch.no_grad():
        ad.down_proj(layers[1]).weight.mul_(1e-3)
    keys = [(i, "mlp") for i in range(3)]
    removed = [0.3, 0.6]
    text = (model_text(model, 8, seed=0), model_text(model, 8, seed=1))
    est, base_est, _, _ = _measure(model, linear, keys, removed, text=text)
    ex, base_ex, _, _ = _measure(model, exact, keys, removed, text=text)
    assert base_est == pytest.approx(base_ex, rel=1e-6)
    for j in range(len(removed)):
        e = [est[k][j][1] for k in keys]
        x = [ex[k][j][1] for k in keys]
        assert sorted(range(3), key=lambda m: e[m]) == sorted(range(3), key=lambda m: x[m]), (e, x)
        assert abs(e[1]) < 0.01 * max(abs(v) for v in e) and abs(x[1]) < 0.01 * max(abs(v) for v in x), (e, x)
        worst = max(range(3), key=lambda m: x[m])
        assert x[worst] > 0.05 and e[worst] == pytest.approx(x[worst], rel=0.25), (e, x)


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3_text"])
def test_linear_estimate_ranks_heads_and_neurons_like_the_exact_rule(family):
    """Attention and MLP of every layer, half and nearly all units removed, text drawn from the
    model: the estimate ranks the six modules as the exact rule measures them (Spearman >= 0.7;
    Gemma 3 normalises each branch before the residual add, so its change is taken after the norm)."""
    model = tiny_model(family)
    keys = [(i, k) for i in range(model.config.num_hidden_layers) for k in ("attn", "mlp")]
    removed = [0.5, 0.9]
    text = (model_text(model, 8, seed=0), model_text(model, 8, seed=1))
    est, _, _, _ = _measure(model, linear, keys, removed, text=text)
    ex, _, _, _ = _measure(model, exact, keys, removed, text=text)
    for j in range(len(removed)):
        e, x = [est[k][j][1] for k in keys], [ex[k][j][1] for k in keys]
        assert _spearman(e, x) >= 0.7, (removed[j], e, x)


def test_keeping_every_unit_estimates_no_increase():
    model = tiny_model("llama")
    keys = [(i, k) for i in range(3) for k in ("attn", "mlp")]
    curves, base, _, _ = _measure(model, linear, keys, [1e-9])
    assert all(abs(c[0][1]) < 1e-4 * base for c in curves.values()), curves


def _layers_model(n_layers: int):
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = n_layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_layer_forwards_grow_linearly_with_depth():
    """Counted by hooks on the model's own layers (one calibration batch, one held-back batch):
    the linear rule runs 4 L layer forwards whatever the number of candidates (held-back forward,
    recompute for the backward, calibration statistics, held-back beside them; a candidate is one
    consumer-sized product, no layer run) and the head once per held-back window; the exact rule's
    count grows quadratically and it calls the head per candidate."""
    removed = [0.25, 0.5]
    lin, exa = {}, {}
    for n in (2, 4, 8):
        keys = [(i, k) for i in range(n) for k in ("attn", "mlp")]
        model = _layers_model(n)
        _, _, lin[n], head_lin = _measure(model, linear, keys, removed, n_calib=4, n_hold=2, batch=4)
        _, _, exa[n], head_exa = _measure(model, exact, keys, removed, n_calib=4, n_hold=2, batch=4)
        cands = len(removed) * 2
        assert lin[n] == 4 * n
        assert head_lin == 2  # one forward (and backward) per held-back window
        assert head_exa == 2 * (cands * n + 1)
    assert lin[8] - lin[4] == 2 * (lin[4] - lin[2])  # affine in L
    assert exa[8] - exa[4] > 3 * (exa[4] - exa[2])  # quadratic in L


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"])
def test_linear_sensitivity_meets_the_sparsity_on_every_family(family):
    model = tiny_model(family)
    cfg = sp.PruneConfig.from_flat(sparsity=0.35, nsamples=12, seqlen=24, batch_size=4, device="cpu", allocation="sensitivity",
                         sensitivity="linear")
    res = sp.prune(model, cfg, calib_windows=windows(12), progress=False)
    assert abs(res.plan.actual_sparsity - 0.35) < 0.04
    info = res.plan.allocation
    assert info["sensitivity"] == "linear" and len(info["curves"]) == 2 * model.config.num_hidden_layers
    assert all(lp.rule.startswith("sensitivity") for lp in res.plan.layers)


def test_linear_plan_follows_its_curves():
    """The kept fractions are `sensitivity_split` of the recorded (estimated) curves."""
    model = tiny_model("llama")
    ad = get_adapter(model.config)
    cfg = sp.PruneConfig.from_flat(sparsity=0.3, nsamples=12, seqlen=24, batch_size=4, device="cpu", allocation="sensitivity",
                         sensitivity="linear", prune_attention=False)
    res = sp.prune(model, cfg, calib_windows=windows(12), progress=False)
    info = res.plan.allocation
    params = module_params(ad)
    want = A.sensitivity_split([info["curves"][f"{i}.mlp"] for i in range(3)], [params[(i, "mlp")] for i in range(3)],
                               info["prunable_sparsity"], cfg.max_layer_sparsity)
    n = res.plan.layers[0].dense_shape["intermediate_size"]
    assert [len(lp.kept_neurons) for lp in res.plan.layers] == pytest.approx([k * n for k in want], abs=1.5)
    assert set(info["terms"]) == set(info["curves"])


def test_sensitivity_option_is_validated_and_reaches_the_run(tmp_path, capsys):
    with pytest.raises(ValueError, match="sensitivity='quadratic'"):
        sp.PruneConfig.from_flat(sensitivity="quadratic")
    assert sp.PruneConfig().allocation.sensitivity == "linear"
    linear = sp.PruneConfig.from_flat(allocation="sensitivity", sensitivity="linear")
    assert sp.PruneConfig.from_dict(linear.to_dict()) == linear
    import json

    from conftest import TINY_WORDS

    from structprune.cli import main

    save_tiny_folder(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "calib.txt").write_text(" ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (3000,), generator=g)))
    out = tmp_path / "out"
    code = main(["prune", str(tmp_path / "tiny"), "--sparsity", "0.2", "--out", str(out), "--calib",
                 str(tmp_path / "calib.txt"), "--nsamples", "8", "--seqlen", "32", "--modules", "mlp",
                 "--allocation", "sensitivity", "--sensitivity", "linear", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().out
    plan = json.loads((out / "structprune_plan.json").read_text())
    assert plan["config"]["allocation"]["sensitivity"] == "linear" and plan["allocation"]["sensitivity"] == "linear"
