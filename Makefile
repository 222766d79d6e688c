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
	$(PY) -m aeic.demo $(if $(IMAGES),--images "$(IMAGES)") $(if $(LIMIT),--limit $(LIMIT)) $(if $(RATE),--rate $(RATE)) \
		$(if $(SCALE_OUT),--scale-out) $(if $(WORKERS),--workers $(WORKERS))

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# mypy ([tool.mypy] in pyproject.toml) on these packages, the aeic package's own modules, benchmarks/ and
# tests/. It cannot follow the editable install's import hook, so build/mypy/aeic links each aeic.X to its
# folder and aeic/*.py to their files; messages name the real files. tests/ has no __init__.py: as pytest
# imports them, each file there is a top-level module (test_bitstream, receiver_support, ...), found
# through mypy_path, and given with -m (mypy takes modules or files, not both).
TYPECHECKED := shared sender codec evaluation training receiver
TYPECHECKED_MODULES := demo local_servers
TYPECHECK_ARGS := $(addprefix -p aeic.,$(TYPECHECKED)) -m aeic $(addprefix -m aeic.,$(TYPECHECKED_MODULES)) -p benchmarks
TYPECHECKED_TESTS := $(wildcard tests/*.py)
TYPECHECK_TEST_ARGS := $(addprefix -m ,$(basename $(notdir $(TYPECHECKED_TESTS))))
typecheck: $(VENV)/.installed
	@mkdir -p build/mypy/aeic
	@for d in $(TYPECHECKED); do ln -sfn ../../../$$d build/mypy/aeic/$$d; done
	@for m in __init__ $(TYPECHECKED_MODULES); do ln -sfn ../../../aeic/$$m.py build/mypy/aeic/$$m.py; done
	@echo "mypy $(TYPECHECK_ARGS) -m <each of tests/*.py>"
	@$(VENV)/bin/mypy $(TYPECHECK_ARGS) $(TYPECHECK_TEST_ARGS) >build/mypy/report.txt 2>&1; status=$$?; \
		sed -e 's|^build/mypy/aeic/\([a-z_]*\.py:\)|aeic/\1|' -e 's|^build/mypy/aeic/||' build/mypy/report.txt; \
		exit $$status

clean:
	rm -rf $(VENV) build *.egg-info

# The sender on another Python (requires-python >= 3.10; JetPack 6 runs 3.10, Raspberry Pi OS 3.11): a venv
# of aeic[sender] alone on SENDER_PYTHON, installed from a copy of the working tree (nothing built in it),
# where torch must not be, `aeic-send encode` must find the shipped model, and the tests that need neither
# torch nor the receiver pass. .ci/run runs it on 3.10.
SENDER_PYTHON ?= python3.10
SENDER_COMPAT := build/sender-compat
SENDER_NEEDS_TORCH := tests/test_sender_e2e.py tests/test_sender_memory.py tests/test_sender_receiver.py
SENDER_TESTS := $(filter-out $(SENDER_NEEDS_TORCH),$(wildcard tests/test_sender_*.py)) \
	tests/test_bitstream.py tests/test_bitstream_spec.py tests/test_entropy_coding.py
.PHONY: sender-compat
sender-compat:
	rm -rf $(SENDER_COMPAT) && mkdir -p $(SENDER_COMPAT)/src $(SENDER_COMPAT)/run
	git ls-files -z --cached --others --exclude-standard | \
		tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C $(SENDER_COMPAT)/src
	$(SENDER_PYTHON) -m venv $(SENDER_COMPAT)/venv
	$(SENDER_COMPAT)/venv/bin/python -m pip install --quiet "./$(SENDER_COMPAT)/src[sender,camera]" "pytest>=8" "hypothesis>=6.100"
	@$(SENDER_COMPAT)/venv/bin/python -c "import importlib.util, sys; print('sender venv:', sys.version.split()[0]); \
		sys.exit('torch got installed in the sender venv' if importlib.util.find_spec('torch') else 0)"
	cd $(SENDER_COMPAT)/run && ../venv/bin/python -c "import numpy as np; from PIL import Image; \
		Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), np.uint8)).save('photo.png')" && \
		../venv/bin/aeic-send encode photo.png -o out && test -s out/photo.aeic
	cd $(SENDER_COMPAT)/run && ../venv/bin/python -m pytest -p no:cacheprovider -c ../src/pyproject.toml \
		--rootdir ../src $(addprefix ../src/,$(SENDER_TESTS))
	rm -rf $(SENDER_COMPAT)
