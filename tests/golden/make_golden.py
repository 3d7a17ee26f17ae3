"""Write the golden records of tests/test_reproduction.py: one JSON per family under tests/golden/.

Must be run on the pre-move commit 3b2dcf4 only: the records are what that commit computed, and
the refactor must reproduce them, so re-running this after the refactor would prove nothing. Kept
for the record. It was run from a checkout of 3b2dcf4 with this file and tests/test_reproduction.py
added (which holds the cases and what is recorded of each):

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/golden/make_golden.py [OUT_DIR]

and again with OMP_NUM_THREADS=2 into another folder; the two outputs were byte-identical.

An INTENDED behaviour change (a new default, a changed estimate) re-records only the cases it
changes, named one by one, on the commit that makes the change, and says so in the docstring of
tests/test_reproduction.py:

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/golden/make_golden.py --only llama/default opt/default
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import test_reproduction as tr  # noqa: E402  (needs the tests folder on the path)


def main(out_dir: Path, only: list[str] | None = None) -> None:
    by_file: dict[str, dict] = {}
    if only:  # merge the named cases into the records already there
        unknown = sorted(set(only) - set(tr.cases()))
        if unknown:
            raise SystemExit(f"no such case: {unknown}")
        for name in only:
            file = out_dir / tr.golden_file(name).name
            by_file.setdefault(file.name, json.loads(file.read_text()) if file.exists() else {})
    for name, case in tr.cases().items():
        if only and name not in only:
            continue
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            by_file.setdefault(tr.golden_file(name).name, {})[name] = tr.record(case, Path(tmp))
        print(f"{name}: {time.perf_counter() - t:.2f} s", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, records in by_file.items():
        (out_dir / file).write_text(dumps(records), encoding="utf-8")


def dumps(records: dict) -> str:
    """JSON with one case field, layer or tensor a line: small, and a diff names what changed."""
    def block(items: dict | list, indent: str) -> str:
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items.items()] if isinstance(items, dict) \
            else [json.dumps(v) for v in items]
        brackets = "{}" if isinstance(items, dict) else "[]"
        return brackets[0] + "\n" + ",\n".join(indent + " " + ln for ln in lines) + "\n" + indent + brackets[1]

    cases = []
    for name, rec in records.items():
        fields = [f'  "{key}": ' + (block(value, "  ") if key in ("layers", "tensors") else json.dumps(value))
                  for key, value in rec.items()]
        cases.append(f" {json.dumps(name)}: {{\n" + ",\n".join(fields) + "\n }")
    return "{\n" + ",\n".join(cases) + "\n}\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    names = args[args.index("--only") + 1:] if "--only" in args else None
    rest = args[:args.index("--only")] if "--only" in args else args
    main(Path(rest[0]) if rest else tr.GOLDEN_DIR, names)
