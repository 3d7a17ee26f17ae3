"""Bad input fails before the work: exit code 2, one `error: ...` line that names the problem and
the fix, no traceback, nothing at --out (nor its working folder), the input folder byte-identical.
Also: SIGINT / SIGTERM mid-run (a real process), --resume, determinism, and disjoint windows."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORDS, save_tiny_folder

from structprune.cli import main
from structprune.io import PROGRESS_NAME, partial_dir

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama folder (context 64 tokens, vocab 96) and a calibration text of 3,000 words."""
    root = tmp_path_factory.mktemp("bad_input")
    save_tiny_folder(root / "tiny")
    g = torch.Generator().manual_seed(0)
    text = " ".join(TINY_WORDS[i] for i in torch.randint(0, 90, (3000,), generator=g).tolist())
    (root / "calib.txt").write_text(text)
    return root


def folder_hash(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _copy_model(base: Path, tmp: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(base / "tiny", dst)
    return dst


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _poison(value: float):
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state["model.layers.1.mlp.down_proj.weight"][0, 0] = value
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _big_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>"] + [f"w{i}" for i in range(200)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(folder)


def _bert(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the case needs a real read-only / small disk")


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield lambda where, options: (_mount(where, options), done.append(where))
    for where in done:
        subprocess.run(["umount", str(where)], check=False)


# --- the table -------------------------------------------------------------------------------
# (case, argv, problem, fix, model edit). {model} is the input model, {out} the output folder,
# {calib} a good calibration text, {tmp} the test's folder. The model argument of a case with an
# edit is a private copy of the tiny folder.

NO_CUDA = not torch.cuda.is_available()
P = ["prune", "{model}", "--out", "{out}", "--calib", "{calib}", "--nsamples", "8", "--seqlen", "32", "--device",
     "cpu", "--no-progress"]


def prune(*extra: str) -> list[str]:
    return P + list(extra)


def with_calib(calib: str, *extra: str) -> list[str]:
    argv = prune(*extra)
    argv[argv.index("{calib}")] = calib
    return argv


CASES = [
    # calibration text
    ("calibration file missing", with_calib("{tmp}/nope.txt"), "neither a file nor a known name",
     "path to a .txt/.jsonl file", None),
    ("calibration file empty", with_calib("{tmp}/empty.txt"), "holds no text", "give a file", None),
    ("calibration file binary", with_calib("{tmp}/binary.txt"), "is not UTF-8 text", "plain-text .txt", None),
    ("calibration text too short", with_calib("{tmp}/short.txt"), "too short for 8 windows of 32 tokens",
     "use a longer text or lower --nsamples", None),
    ("jsonl without a text field", with_calib("{tmp}/notext.jsonl"), "record 1 has no 'text' field (its keys: body)",
     "every record needs a string 'text' field", None),
    ("jsonl line not JSON", with_calib("{tmp}/broken.jsonl"), "line 2 is not JSON", "one JSON record", None),
    # the model's files
    ("truncated safetensors", prune(), "model.safetensors is truncated", "re-download or re-save", _truncate),
    ("zero-byte safetensors", prune(), "is empty (0 bytes)", "re-download or re-save",
     lambda f: (f / "model.safetensors").write_bytes(b"")),
    ("config.json not JSON", prune(), "config.json is not valid JSON", "restore the model's original config.json",
     lambda f: (f / "config.json").write_text('{"model_type": "llama",')),
    ("unsupported model_type", prune(), "unsupported architecture model_type='bert'", "supports", _bert),
    ("folder without config.json", prune(), "has no config.json", "pass a model folder",
     lambda f: (f / "config.json").unlink()),
    ("GGUF file that is not a model", ["prune", "{tmp}/fake.gguf"] + P[2:], "is not a GGUF model file",
     "pass a real .gguf model", None),
    ("GGUF magic but no model", ["prune", "{tmp}/stub.gguf"] + P[2:], "could not be read as a GGUF model",
     "pass a complete .gguf model", None),
    ("GGUF truncated in its metadata", ["prune", "{tmp}/cut.gguf"] + P[2:], "truncated",
     "pass a complete .gguf model", None),
    ("model path missing (relative)", ["prune", "missing/model"] + P[2:], "does not exist", "check the path", None),
    ("NaN weight", prune(), "'model.layers.1.mlp.down_proj.weight'", "holds NaN or Inf", _poison(math.nan)),
    ("Inf weight", prune(), "'model.layers.1.mlp.down_proj.weight'", "holds NaN or Inf", _poison(math.inf)),
    ("tokenizer.json not JSON", prune(), "has no usable tokenizer files (missing or unreadable)",
     "save the model's tokenizer into that folder", lambda f: (f / "tokenizer.json").write_text("{broken")),
    ("tokenizer larger than the embedding", prune(), "the tokenizer has 201 tokens but the model's embedding has 96",
     "use the tokenizer that was saved with this model", _big_tokenizer),
    # the output
    ("--out is a file", [a.replace("{out}", "{tmp}/afile") for a in prune()], "exists and is a file",
     "choose another --out", None),
    ("--out not empty", [a.replace("{out}", "{tmp}/busy") for a in prune()], "exists and is not empty",
     "pass --overwrite", None),
    ("--out inside the input model folder", [a.replace("{out}", "{model}/pruned") for a in prune()],
     "inside the input model folder", "write the pruned model somewhere else", None),
    ("--out is the input model folder", [a.replace("{out}", "{model}") for a in prune("--overwrite")],
     "is the input model folder", "somewhere else", None),
    ("--out on a read-only filesystem", [a.replace("{out}", "{tmp}/ro/out") for a in prune()], "is not writable",
     "choose an --out on a writable disk", "ro"),
    ("--out on a full disk", [a.replace("{out}", "{tmp}/small/out") for a in prune()], "not enough disk space",
     "free some space or choose an --out on another disk", "small"),
    # numeric flags
    ("sparsity above the maximum", prune("--sparsity", "0.97"), "sparsity=0.97 is invalid", "[0, 0.95]", None),
    ("sparsity 0.95 unreachable", prune("--sparsity", "0.95"), "sparsity=0.95 cannot be reached",
     "Use --sparsity 0.854 or less", None),
    ("negative sparsity", prune("--sparsity", "-0.1"), "sparsity=-0.1 is invalid", "[0, 0.95]", None),
    ("sparsity NaN", prune("--sparsity", "nan"), "sparsity=nan is invalid", "fraction", None),
    ("nsamples 0", prune("--nsamples", "0"), "nsamples=0 is invalid", "at least one", None),
    ("seqlen too small", prune("--seqlen", "4"), "seqlen=4 is invalid", "at least 8", None),
    ("seqlen beyond the context", prune("--seqlen", "100000"), "longer than the model's context of 64 tokens",
     "use --seqlen 64 or less", None),
    ("nsamples beyond the text", prune("--nsamples", "1000"), "too short for 1000 windows",
     "lower --nsamples/--seqlen", None),
    ("batch size 0", prune("--batch-size", "0"), "batch_size=0 is invalid", ">= 1", None),
    ("chunk tokens too small", prune("--chunk-tokens", "8"), "chunk_tokens=8 is invalid", ">= 16", None),
    ("max layer sparsity 0", prune("--max-layer-sparsity", "0"), "max_layer_sparsity=0.0 is invalid", "(0, 1]",
     None),
    ("max layer sparsity > 1", prune("--max-layer-sparsity", "1.5"), "max_layer_sparsity=1.5 is invalid", "(0, 1]",
     None),
    ("target mix > 1", prune("--target", "residual", "--target-mix", "2"), "target_mix=2.0 is invalid", "[0, 1]",
     None),
    ("negative rho", prune("--rho", "-1"), "rho='-1' is invalid", "a number >= 0", None),
    ("negative temperature", prune("--allocation", "softmax", "--temperature", "-1"), "temperature='-1' is invalid",
     "positive number", None),
    ("temperature NaN", prune("--allocation", "softmax", "--temperature", "nan"), "temperature='nan' is invalid",
     "positive number", None),
    ("gamma NaN", prune("--allocation", "softmax-modular", "--gamma", "nan"), "--gamma nan is not a finite number",
     "give a real number", None),
    ("negative ADMM iterations", prune("--reconstruction", "admm", "--admm-iters", "-1"), "admm_iters=-1 is invalid",
     ">= 0", None),
    ("ADMM penalty 0", prune("--reconstruction", "admm", "--admm-alpha", "0"), "admm_alpha=0.0 is invalid",
     "must be positive", None),
    ("negative ADMM SGD steps", prune("--admm-sgd-steps", "-1"), "admm_sgd_steps=-1 is invalid", ">= 0", None),
    ("negative ADMM attention steps", prune("--admm-attn-steps", "-2"), "admm_attn_steps=-2 is invalid", ">= 0",
     None),
    ("negative seed", prune("--seed", "-1"), "--seed -1 is out of range", "[0, 2**63)", None),
    ("--windows 0 with --eval", prune("--eval", "--data", "{calib}", "--windows", "0"), "--windows 0 is out of range",
     "integer >= 1", None),
    ("--eval-seqlen beyond the context", prune("--eval", "--data", "{calib}", "--eval-seqlen", "4096"),
     "--eval-seqlen 4096 is longer than the model's context", "use --eval-seqlen 64 or less", None),
    ("unknown device", prune("--device", "tpu"), "device='tpu'", "cpu", None),
    ("--device cuda without CUDA", prune("--device", "cuda"), "CUDA is not available", "use --device cpu", "nocuda"),
    # eval and info
    ("eval: missing folder (relative)", ["eval", "missing/model", "--seqlen", "32", "--windows", "2"],
     "does not exist", "check the path", None),
    ("eval: missing folder (absolute)", ["eval", "{tmp}/gone", "--seqlen", "32", "--windows", "2"],
     "does not exist", "check the path", None),
    ("eval --tasks: missing folder", ["eval", "missing/model", "--tasks", "wiki_lastword"],
     "does not exist", "check the path", None),
    ("eval: seqlen beyond the context", ["eval", "{model}", "--data", "{calib}", "--seqlen", "4096", "--windows",
                                        "2"], "longer than the model's context of 64", "--seqlen 64 or less", None),
    ("eval: windows 0", ["eval", "{model}", "--data", "{calib}", "--seqlen", "32", "--windows", "0"],
     "--windows 0 is out of range", "integer >= 1", None),
    ("info: missing folder", ["info", "{tmp}/gone"], "does not exist", "pass a folder written by", None),
    ("info: dense folder", ["info", "{model}"], "is a dense (unpruned) llama model folder with 3 layers",
     "Prune it first", None),
]


@pytest.mark.parametrize("case,argv,problem,fix,edit", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_table(base, tmp_path, capsys, monkeypatch, mounts, case, argv, problem, fix, edit):
    if edit == "nocuda" and not NO_CUDA:
        pytest.skip("CUDA is available on this machine")
    model = base / "tiny"
    if callable(edit):
        model = _copy_model(base, tmp_path)
        edit(model)
    elif edit == "ro":
        mounts(tmp_path / "ro", "ro,size=1m")
    elif edit == "small":
        mounts(tmp_path / "small", "size=16k")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "short.txt").write_text(" ".join(TINY_WORDS[:50]))
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps({"text": "w1 w2"}) + "\n{not json\n")
    (tmp_path / "fake.gguf").write_text("this is not a model\n")
    (tmp_path / "stub.gguf").write_bytes(b"GGUF" + bytes(60))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5))  # 5 metadata entries promised, none
    (tmp_path / "afile").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("x")
    out = tmp_path / "out"
    subs = {"{model}": str(model), "{out}": str(out), "{calib}": str(base / "calib.txt"), "{tmp}": str(tmp_path)}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    monkeypatch.chdir(tmp_path)  # relative "missing/model": its first part does not exist either
    (tmp_path / "missing").mkdir()
    before = folder_hash(model)
    others = sorted(p.name for p in tmp_path.iterdir())

    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1, err
    assert problem in line[0] and fix in line[0], line[0]
    assert "Traceback" not in err
    for target in (out, tmp_path / "ro" / "out", tmp_path / "small" / "out", model / "pruned"):
        assert not target.exists() and not partial_dir(target).exists()
    assert folder_hash(model) == before, "the input model folder changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == others, "something was written beside --out"
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep"]


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25


def test_unparsable_number_is_a_usage_error(base, tmp_path, capsys):
    """argparse refuses a flag that is not a number: usage error, exit code 2, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(["prune", str(base / "tiny"), "--out", str(tmp_path / "o"), "--nsamples", "many"])
    assert e.value.code == 2
    assert "argument --nsamples: invalid int value: 'many'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_script_exit_code_and_no_traceback(base, tmp_path):
    """The installed entry point, as a real process: an unreachable sparsity gives exit code 2 and an
    `error:` line, no traceback."""
    script = Path(sys.executable).parent / "structprune"
    entry = [str(script)] if script.is_file() else [sys.executable, "-m", "structprune.cli"]
    r = subprocess.run([*entry, "prune", str(base / "tiny"), "--out",
                        str(tmp_path / "o"), "--calib", str(base / "calib.txt"), "--sparsity", "0.95", "--seqlen", "32",
                        "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "error: sparsity=0.95 cannot be reached" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_eval_on_a_dense_folder_works(base, capsys):
    """eval is for any model (dense or pruned); only info needs a pruned folder."""
    code = main(["eval", str(base / "tiny"), "--data", str(base / "calib.txt"), "--seqlen", "32", "--windows", "2",
                 "--no-progress"])
    assert code == 0 and "perplexity" in capsys.readouterr().out


# --- interrupted runs: real processes, real signals --------------------------------------------

def _deep_folder(folder: Path) -> None:
    """A llama of 10 layers: work left after the first finished layer for the signal to land in
    (it lands within a layer: one or two are finished)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=10,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<unk>"] + TINY_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def deep(base):
    folder = base / "deep"
    _deep_folder(folder)
    return folder


def _prune_argv(model: Path, out: Path, calib: Path) -> list[str]:
    return ["prune", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "16", "--seqlen", "64",
            "--device", "cpu", "--no-progress", "--log-level", "INFO", "--allocation", "uniform"]  # open: a resumed sensitivity
    # run records its allocation curves with other rounding than an uninterrupted one (issue 18 note)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_exits_cleanly_and_resume_completes(base, deep, tmp_path, capsys, sig, code):
    out = tmp_path / "out"
    before = folder_hash(deep)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "structprune.cli", *_prune_argv(deep, out, base / "calib.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # the first layer is on disk and recorded once its log line appears
        lines.append(line)
        if " layer 0: " in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    rc = proc.wait(timeout=300)
    err = "".join(lines) + rest
    assert rc == code, err
    assert "Traceback" not in err
    assert f"interrupted by {sig.name}" in err and "--resume" in err
    assert not out.exists(), "--out must not be half-written"
    part = partial_dir(out)
    progress = json.loads((part / PROGRESS_NAME).read_text())
    finished = sorted(e["index"] for e in progress["layers"])
    assert finished and finished == list(range(len(finished))) and len(finished) < 10
    assert folder_hash(deep) == before

    assert main(_prune_argv(deep, out, base / "calib.txt") + ["--resume", "--log-level", "WARNING"]) == 0
    assert out.is_dir() and not part.exists()
    fresh = tmp_path / "fresh"
    assert main(_prune_argv(deep, fresh, base / "calib.txt") + ["--log-level", "WARNING"]) == 0
    capsys.readouterr()
    _assert_same_run(out, fresh)
    assert folder_hash(deep) == before


# --- determinism -----------------------------------------------------------------------------

def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if k not in ("timing", "seconds")}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def _assert_same_run(a: Path, b: Path) -> None:
    weights = sorted(p.name for p in a.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in b.glob("*.safetensors"))
    for name in weights:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    plan_a = _strip_times(json.loads((a / "structprune_plan.json").read_text()))
    plan_b = _strip_times(json.loads((b / "structprune_plan.json").read_text()))
    assert json.dumps(plan_a, sort_keys=True) == json.dumps(plan_b, sort_keys=True)
    for name in ("config.json", "model.safetensors.index.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("method", ["structprune", "wanda-sp"])
def test_same_command_twice_gives_identical_plans_and_weights(base, tmp_path, capsys, method):
    argv = ["prune", str(base / "tiny"), "--calib", str(base / "calib.txt"), "--nsamples", "16", "--seqlen", "32",
            "--device", "cpu", "--no-progress", "--method", method, "--log-level", "WARNING"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_api_checks_the_model_before_loading(base, tmp_path):
    """structprune.prune("folder") runs the same model checks as the CLI (PreflightError, a ValueError)."""
    import structprune as sp
    from structprune.preflight import PreflightError

    model = _copy_model(base, tmp_path)
    _truncate(model)
    with pytest.raises(PreflightError, match="model.safetensors is truncated"):
        sp.prune(str(model), sp.PruneConfig.from_flat(nsamples=4, seqlen=32, calib=str(base / "calib.txt"), device="cpu"))
    with pytest.raises(PreflightError, match="longer than the model's context of 64"):
        sp.prune(str(base / "tiny"), sp.PruneConfig.from_flat(nsamples=4, seqlen=128, calib=str(base / "calib.txt"),
                                                    device="cpu"))
