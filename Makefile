# The two setup commands of the README:
#   make demo   install, write the tiny offline encoders, build + verify the bundled toy dataset
#   make test   install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the tiny-offline preset reads the tiny encoders (`shardkit tiny-models` writes there by default).
TINY := $(HOME)/.cache/shardkit/tiny-models
DEMO_OUT := out/toy

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned: where a local CPU wheel of 2.13.0 is provided (CI machines) pip takes it
# instead of downloading gigabytes of CUDA packages; elsewhere pip picks the platform's build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==2.13.0" || $(BIN)/python -m pip install --quiet torch
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/shardkit tiny-models $(TINY)
	$(BIN)/shardkit build examples/toy-dataset $(DEMO_OUT) --config tiny-offline --overwrite --no-progress
	$(BIN)/shardkit inspect $(DEMO_OUT) --verify --no-progress

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(TINY)
