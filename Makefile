# Set-up and everyday commands. `make chat` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
TSTAMP  = $(VENV)/.installed-test

.PHONY: setup setup-test triton browser chat test test-fast clean

setup: $(STAMP)
setup-test: $(TSTAMP)

# torch first and pinned: left to pip's resolver it would pull a multi-GB CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

# what only the tests need (transformers, the openai client, playwright, schemathesis, ...)
$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(TSTAMP)

chat: setup            ## chat with the offline default model
	$(BIN)/qwen chat

# Debian's chromium for the chat-page test in a real browser (skipped where it cannot be installed,
# except in CI, where .ci/run makes a missing browser a failure)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  ($$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	   ($$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1)) || \
	  echo "note: could not install chromium; the browser test will be skipped"; }

# Triton for the GPU-kernel tests, which run in its interpreter on a CPU (skipped where it cannot be
# installed, except in CI, where .ci/run makes a missing triton a failure). 3.9: the interpreter of
# earlier releases fails with numpy >= 2.4 on loops whose bounds come from program ids.
triton: setup-test
	@$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q 'triton==3.9.0' || \
	  echo "note: could not install triton; the kernel tests will be skipped"

test: setup-test triton browser    ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup-test  ## without the tests that need the real default model
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
