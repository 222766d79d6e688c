# Every target builds .venv from scratch when it is missing. torch is pinned to the CPU wheel
# first so that no later requirement pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: test demo bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
# piq: weight-free IQA metrics for aeic eval. --no-deps because it requires torchvision only for the
# learned metrics we never load (torchvision must not be installed next to the CPU torch wheel).
	$(PY) -m pip install --quiet --no-deps "piq==0.8.0"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(PY) -m aeic.demo $(if $(IMAGES),--images $(IMAGES)) $(if $(RATE),--rate $(RATE)) \
		$(if $(SCALE_OUT),--scale-out) $(if $(WORKERS),--workers $(WORKERS))

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
