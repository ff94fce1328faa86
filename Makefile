# The two entry points: `make demo` (the main job on the sample cases) and `make test`.
# Each creates .venv on first use and reuses it afterwards.
PYTHON ?= python3
VENV ?= .venv
SAMPLES ?= ../shared/data/real
DATASET ?= demo

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# Telemetry and update checks off for everything started from here.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export UNET_SAMPLES := $(abspath $(SAMPLES))

.PHONY: demo test venv clean

venv: $(VENV)/.installed

# torch is installed first and pinned to the CPU build on disk, so that no dependency
# resolution can pull a CUDA wheel.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(BIN)/python -m unet.demo --samples $(SAMPLES) --spec configs/datasets/$(DATASET).yaml

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf preprocessed model predictions reports metrics.json registration.json mlflow.db mlartifacts
