# Every target builds .venv from scratch when it is missing. torch is installed first, pinned, so that
# no later requirement picks another build. From PyPI on Linux x86_64 that is the multi-GB CUDA build;
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU wheel from PyTorch's index instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: test demo bench lint typecheck clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
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

# mypy ([tool.mypy] in pyproject.toml) on these packages and benchmarks/. It cannot follow the editable
# install's import hook, so build/mypy/aeic links each aeic.X to its folder (receiver too, which the
# others import; its own errors are not reported); messages name the real files.
TYPECHECKED := shared sender codec evaluation training
typecheck: $(VENV)/.installed
	@mkdir -p build/mypy/aeic
	@for d in $(TYPECHECKED) receiver; do ln -sfn ../../../$$d build/mypy/aeic/$$d; done
	@echo "mypy $(addprefix -p aeic.,$(TYPECHECKED)) -p benchmarks"
	@$(VENV)/bin/mypy $(addprefix -p aeic.,$(TYPECHECKED)) -p benchmarks >build/mypy/report.txt 2>&1; \
		status=$$?; sed 's|^build/mypy/aeic/||' build/mypy/report.txt; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
