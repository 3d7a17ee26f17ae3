"""Built-in models (io/builtin.py): the chunk assembly on small fake files, the lookup through a fake
package layout, and (slow) the real gemma3-270m from its chunk packages."""

from __future__ import annotations

import hashlib
import os

import pytest

from structprune.io import builtin
from structprune.io.builtin import Builtin, assemble_chunks, builtin_gguf, cache_dir


def _parts(tmp_path, blobs):
    paths = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"model.gguf.part{i:02d}"
        p.write_bytes(blob)
        paths.append(p)
    return paths, hashlib.sha256(b"".join(blobs)).hexdigest()


def test_assembly_concatenates_in_order_and_reuses_the_file(tmp_path, monkeypatch):
    blobs = [os.urandom(3000), os.urandom(1), os.urandom(2 << 20)]  # one part over the 1 MiB block
    parts, sha = _parts(tmp_path, blobs)
    target = tmp_path / "cache" / "model.gguf"
    assert assemble_chunks(parts, sha, target) == target
    assert target.read_bytes() == b"".join(blobs)
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temporary file left behind

    def fail(*a, **k):
        raise AssertionError("a second call must reuse the assembled file")

    monkeypatch.setattr(builtin.uuid, "uuid4", fail)
    mtime = target.stat().st_mtime_ns
    assert assemble_chunks(parts, sha, target) == target
    assert target.stat().st_mtime_ns == mtime
    monkeypatch.setattr(builtin, "sha256_file", fail)  # hashed once in this process: not again
    assert assemble_chunks(parts, sha, target) == target


def test_assembly_refuses_a_sha256_mismatch_and_leaves_nothing(tmp_path):
    parts, _ = _parts(tmp_path, [b"abc", b"def"])
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ValueError, match="not the expected"):
        assemble_chunks(parts, "0" * 64, target)
    assert list(target.parent.iterdir()) == []


def test_interrupted_assembly_never_leaves_a_half_file(tmp_path, monkeypatch):
    parts, sha = _parts(tmp_path, [os.urandom(100), os.urandom(100)])
    target = tmp_path / "cache" / "model.gguf"
    real_open = open

    def open_failing_on_second_part(path, mode="r", *a, **k):
        if str(path) == str(parts[1]):
            raise KeyboardInterrupt
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", open_failing_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        assemble_chunks(parts, sha, target)
    monkeypatch.undo()
    assert list(target.parent.iterdir()) == []
    assert assemble_chunks(parts, sha, target).read_bytes() == parts[0].read_bytes() + parts[1].read_bytes()


def test_a_corrupt_cached_file_is_assembled_again(tmp_path):
    parts, sha = _parts(tmp_path, [b"hello ", b"world"])
    target = tmp_path / "model.gguf"
    target.write_bytes(b"hello wor")  # e.g. a copy truncated by hand
    assert assemble_chunks(parts, sha, target).read_bytes() == b"hello world"


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "sp"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "sp"
    monkeypatch.delenv("STRUCTPRUNE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "structprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "structprune"


def _fake_packages(root, name, blobs):
    """A chunked built-in laid out like the registry packages: an index package and one package per part."""
    (root / f"{name}").mkdir()
    (root / f"{name}" / "__init__.py").write_text("raise ImportError('never imported')\n")
    chunks = []
    for i, blob in enumerate(blobs):
        pkg = root / f"{name}_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(blob)
        chunks.append((pkg.name, f"data/m.gguf.part{i:02d}"))
    return Builtin(package=name, filename="m.gguf", install=f"pip install {name}",
                   chunks=tuple(chunks), sha256=hashlib.sha256(b"".join(blobs)).hexdigest())


def test_builtin_gguf_assembles_a_chunked_entry_into_the_cache(tmp_path, monkeypatch):
    blobs = [b"GGUF" + os.urandom(50), os.urandom(70)]
    entry = _fake_packages(tmp_path, "fake_chunked_model_pkg", blobs)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(builtin.BUILTIN, "fake-model", entry)
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    path = builtin_gguf("fake-model")
    assert path == tmp_path / "cache" / "m.gguf"
    assert path.read_bytes() == b"".join(blobs)


def test_builtin_gguf_names_the_pip_command_when_packages_are_missing(tmp_path, monkeypatch):
    entry = _fake_packages(tmp_path, "fake_chunked_model_pkg2", [b"a", b"b"])
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fake_chunked_model_pkg2_part2" / "__init__.py").unlink()
    (tmp_path / "fake_chunked_model_pkg2_part2" / "data" / "m.gguf.part01").unlink()
    (tmp_path / "fake_chunked_model_pkg2_part2" / "data").rmdir()
    (tmp_path / "fake_chunked_model_pkg2_part2").rmdir()
    monkeypatch.setitem(builtin.BUILTIN, "fake-model", entry)
    with pytest.raises(FileNotFoundError, match="pip install fake_chunked_model_pkg2"):
        builtin_gguf("fake-model")
    missing = Builtin(package="no_such_pkg_structprune_x", filename="x.gguf", install="pip install x==1")
    monkeypatch.setitem(builtin.BUILTIN, "missing", missing)
    with pytest.raises(FileNotFoundError, match=r"'missing' needs its packages.*pip install x==1"):
        builtin_gguf("missing")


def test_a_chunked_entry_needs_its_sha256():
    with pytest.raises(ValueError, match="sha256"):
        Builtin(package="p", filename="f.gguf", install="pip install p", chunks=(("p1", "data/f.part00"),))


def test_the_table_names_both_models_and_their_install_commands():
    assert builtin.canonical("Gemma-3-270M") == "gemma3-270m"
    assert builtin.canonical("default") == "smollm2-135m"
    gemma = builtin.BUILTIN["gemma3-270m"]
    assert len(gemma.chunks) == 4 and all(f"part{i}" in gemma.install for i in range(1, 5))


@pytest.mark.slow
def test_gemma3_270m_resolves_and_loads(tmp_path):
    try:
        path = builtin_gguf("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(f"gemma3-270m packages not installed: {e}")
    assert path.read_bytes()[:4] == b"GGUF"
    from structprune.io.resolve import load_model

    model, tok = load_model("gemma3-270m")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "gemma3_text", 18, 4, 1)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == cfg.vocab_size
