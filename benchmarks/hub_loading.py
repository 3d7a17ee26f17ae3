"""Load a pruned folder with plain transformers (trust_remote_code) in an interpreter where structprune
cannot be imported, and compare it with structprune.load_pruned (same process tree, same machine).

    python benchmarks/hub_loading.py out/smollm2-135m-softmax --out benchmarks/results/hub_loading.json

The child runs `python -I -S` with only the bare site-packages folder on sys.path (no .pth files, so an
editable structprune install is invisible) and asserts that structprune is not importable.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

CHILD = textwrap.dedent("""
    import importlib.util, sys, time
    sys.path.append(sys.argv[1])
    assert importlib.util.find_spec("structprune") is None, "structprune is importable"
    import torch
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True, dtype=torch.float32).eval()
    seconds = time.perf_counter() - t0
    ids = torch.load(sys.argv[3])
    with torch.no_grad():
        out = {"class": type(model).__name__, "load_seconds": seconds,
               "logits": model(input_ids=ids, use_cache=False).logits,
               "generated": model.generate(ids[:1, :16], max_new_tokens=16, do_sample=False, pad_token_id=0)}
    torch.save(out, sys.argv[4])
""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from structprune.io import load_pruned

    folder = Path(args.folder).resolve()
    ref = load_pruned(folder)
    ids = torch.randint(0, ref.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits
        want_gen = ref.generate(ids[:1, :16], max_new_tokens=16, do_sample=False, pad_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, Path(tmp) / "ids.pt")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(HF_HOME=str(Path(tmp) / "hf"), HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, site.getsitepackages()[0], str(folder),
                               str(Path(tmp) / "ids.pt"), str(Path(tmp) / "got.pt")], cwd=tmp, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        got = torch.load(Path(tmp) / "got.pt")
    config = json.loads((folder / "config.json").read_text())
    result = {"folder": args.folder, "auto_map": config.get("auto_map"), "class": got["class"],
              "structprune_importable_in_child": False, "child_load_seconds": got["load_seconds"],
              "layer_shapes": [f"{s['num_heads']}/{s['num_kv_heads']} heads, {s['intermediate_size']} neurons"
                               for s in config["structprune"]["layers"]],
              "max_abs_logit_diff": float((got["logits"] - want).abs().max()),
              "logit_scale": float(want.abs().max()),
              "greedy_tokens_equal": bool(torch.equal(got["generated"], want_gen)),
              "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["greedy_tokens_equal"] and result["max_abs_logit_diff"] < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
