"""PruneConfig and its sections: validation naming the field, the flat option map, and the JSON
round trip of every config class (nested version 2 and the flat version-1 dicts of old plans)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from structprune.config import (
    FLAT,
    AdmmConfig,
    AllocationConfig,
    FlapConfig,
    PruneConfig,
    RefitConfig,
    parse_rho,
    parse_temperature,
)

ROOT = Path(__file__).resolve().parents[1]

# Every class with values other than its defaults (a round trip of defaults proves little).
EXAMPLES = [
    AdmmConfig(iters=2, alpha=0.5, beta=3.0, gamma=2.0, sgd_steps=5, attn_steps=0),
    RefitConfig(method="lstsq", target="residual", target_mix=0.5, damp=0.1, bias_compensation=True,
                admm=AdmmConfig(iters=7)),
    AllocationConfig(rule="softmax", sensitivity="linear", temperature=0.1, temperature_relative=True, rho=0.5,
                     gamma=0.2, layer_importance="raw"),
    AllocationConfig(rule="softmax-modular", temperature=math.inf),
    FlapConfig(standardise="kind", square_attention=False),
    PruneConfig(sparsity=0.5, nsamples=16, seqlen=128, seed=3, batch_size=2, chunk_tokens=512, calib="c4",
                device="cpu", dtype="bfloat16", prune_attention=False, max_layer_sparsity=0.8, round_to=8,
                scorer="magnitude", selection="obs", allocation=AllocationConfig(rule="softmax", rho=0.0),
                refit=RefitConfig(method="admm", damp=0.05, admm=AdmmConfig(iters=3))),
    PruneConfig(allocation=AllocationConfig(rule="flap"), refit=RefitConfig(method="none"),
                flap=FlapConfig(standardise="kind")),
]


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: type(c).__name__)
def test_json_round_trip_of_every_config_class(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


def test_prune_config_dict_is_nested_and_versioned():
    data = PruneConfig().to_dict()
    assert data["_version"] == 2
    assert data["allocation"]["rule"] == "sensitivity" and data["allocation"]["sensitivity"] == "linear"
    assert data["allocation"]["rho"] is None
    assert data["refit"]["method"] == "lstsq" and data["refit"]["admm"]["iters"] == 4
    assert data["flap"] == {"standardise": "layer", "square_attention": True}


def test_flat_version_1_dict_is_read():
    """A plan config as written before version 2: flat, "auto" / "0.1x" strings, a retired field."""
    old = {"sparsity": 0.3, "scope": "layer", "nsamples": 64, "seqlen": 512, "seed": 0, "batch_size": 8,
           "calib": "wiki", "scorer": "wanda", "allocation": "softmax-modular", "reconstruction": "admm",
           "target": "local", "damp": 0.01, "bias_compensation": False, "prune_attention": True, "prune_mlp": True,
           "max_layer_sparsity": 0.9, "temperature": "0.1x", "rho": "0", "gamma": 0.0, "admm_iters": 2,
           "admm_alpha": 1.0, "admm_beta": 10.0, "admm_gamma": 1.0, "chunk_tokens": 8192, "device": "auto",
           "dtype": "float32", "refit_holdout": 0}
    cfg = PruneConfig.from_dict(old)
    assert cfg.allocation == AllocationConfig(rule="softmax-modular", temperature=0.1, temperature_relative=True,
                                              rho=0.0)
    assert cfg.refit.method == "admm" and cfg.refit.admm.iters == 2
    assert PruneConfig.from_dict({"allocation": "softmax", "temperature": "auto", "rho": "auto"}).allocation == \
        AllocationConfig(rule="softmax")


def saved_plan_configs() -> list[tuple[str, dict]]:
    files = sorted((ROOT / "benchmarks" / "results").glob("**/plans/*.json.gz"))
    files += sorted(p for p in ROOT.glob("**/structprune_plan.json") if ".venv" not in p.parts)
    out = []
    for f in files:
        with gzip.open(f, "rt") if f.suffix == ".gz" else open(f) as fh:
            out.append((str(f.relative_to(ROOT)), json.load(fh)["config"]))
    return out


def test_every_saved_plan_config_is_read():
    """benchmarks/results plans (flat version 1): every value they record survives the reading."""
    configs = saved_plan_configs()
    if not configs:
        pytest.skip("no saved plans in this checkout")
    for name, old in configs:
        cfg = PruneConfig.from_dict(old)
        flat = cfg.to_flat()
        for key, value in old.items():
            if key in ("refit_holdout", "_version") or isinstance(value, dict):
                continue
            want = parse_rho(value) if key == "rho" else parse_temperature(value) if key == "temperature" else value
            got = parse_rho(flat[key]) if key == "rho" else (
                parse_temperature(flat[key]) if key == "temperature" else flat[key])
            assert got == want, (name, key)
        assert PruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_flat_maps_every_flat_name_and_back():
    cfg = PruneConfig.from_flat(allocation="softmax", temperature="0.25x", rho="auto", admm_iters=9,
                                reconstruction="admm", flap_standardise="kind", bias_compensation=True, sparsity=0.4)
    assert cfg.allocation.rule == "softmax" and cfg.allocation.rho is None
    assert (cfg.allocation.temperature, cfg.allocation.temperature_relative) == (0.25, True)
    assert cfg.refit == RefitConfig(method="admm", bias_compensation=True, admm=AdmmConfig(iters=9))
    assert cfg.flap.standardise == "kind" and cfg.sparsity == 0.4
    flat = cfg.to_flat()
    assert set(flat) == {*FLAT, "temperature"} and flat["temperature"] == "0.25x" and flat["rho"] == "auto"
    assert PruneConfig.from_flat(**flat) == cfg
    assert PruneConfig.from_flat() == PruneConfig()


def test_unknown_flat_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown options \['rhoo'\].*admm_iters"):
        PruneConfig.from_flat(rhoo=1.0)


def test_unknown_version_and_field_are_refused():
    with pytest.raises(ValueError, match="_version=3"):
        PruneConfig.from_dict({"_version": 3})
    with pytest.raises(ValueError, match="unknown AllocationConfig fields"):
        PruneConfig.from_dict({"_version": 2, "allocation": {"rule": "uniform", "tau": 1}})


@pytest.mark.parametrize("text, want", [("auto", (None, False)), (None, (None, False)), ("0.1x", (0.1, True)),
                                        ("2", (2.0, False)), (3, (3.0, False)), ("inf", (math.inf, False))])
def test_parse_temperature(text, want):
    assert parse_temperature(text) == want


@pytest.mark.parametrize("text", ["0", "-1", "hot", "0x", "nan"])
def test_bad_temperature_names_the_field(text):
    with pytest.raises(ValueError, match="temperature="):
        PruneConfig.from_flat(temperature=text)


def test_parse_rho():
    assert parse_rho("auto") is None and parse_rho(None) is None
    assert parse_rho("0") == 0.0 and parse_rho(1) == 1.0
    for bad in ("-0.5", "half"):
        with pytest.raises(ValueError, match="rho="):
            parse_rho(bad)


@pytest.mark.parametrize("make, field", [
    (lambda: AdmmConfig(iters=-1), "admm_iters"),
    (lambda: AdmmConfig(beta=0.0), "admm_beta"),
    (lambda: RefitConfig(method="sgd"), "reconstruction"),
    (lambda: RefitConfig(target="residual", method="admm"), "reconstruction"),
    (lambda: RefitConfig(damp=0.0), "damp"),
    (lambda: AllocationConfig(rule="magic"), "allocation"),
    (lambda: AllocationConfig(rho=-1.0), "rho"),
    (lambda: AllocationConfig(rho="auto"), "rho"),
    (lambda: AllocationConfig(temperature="0.1x"), "temperature"),
    (lambda: AllocationConfig(temperature_relative=True), "temperature_relative"),
    (lambda: FlapConfig(standardise="model"), "flap_standardise"),
    (lambda: PruneConfig(sparsity=0.99), "sparsity"),
    (lambda: PruneConfig(prune_attention=False, prune_mlp=False), "prune_attention/prune_mlp"),
    # the rules that join sections
    (lambda: PruneConfig.from_flat(selection="obs", reconstruction="none"), "reconstruction"),
    (lambda: PruneConfig.from_flat(allocation="flap"), "reconstruction"),
    (lambda: PruneConfig.from_flat(allocation="flap", reconstruction="none", scope="global"), "scope"),
    (lambda: PruneConfig.from_flat(scope="global", reconstruction="none", round_to=8), "round_to"),
])
def test_invalid_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        make()


def test_nested_replace_and_with_flat_agree():
    cfg = PruneConfig.from_flat(allocation="softmax")
    nested = cfg.replace(allocation=cfg.allocation.replace(rho=1.0, temperature=0.5))
    assert nested == cfg.with_flat(rho=1.0, temperature="0.5")
    assert cfg.with_flat(rho=1.0).allocation.rule == "softmax"  # the other options kept
