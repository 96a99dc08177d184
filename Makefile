# `make demo` and `make test` work on a fresh machine: they create the virtual
# environment, install the package with its dependencies, then run.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo-output

.PHONY: venv demo test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 \
		| { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

demo: venv
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/radioactive demo --output-dir $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
