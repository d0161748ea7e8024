# Glowing: `make help` lists the targets.
PY        ?= python3
VENV      ?= .venv
PYTHON    := $(VENV)/bin/python
PRESET    ?= cpu
ARTIFACTS ?= artifacts
# The shared data folder where it exists; otherwise the training code falls back to the hub.
DATA_DIR  ?= $(if $(wildcard ../shared/data/imdb),../shared/data,)
TRAIN_ARGS ?=

.PHONY: help install test models clean-models export bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv: torch==2.13.0 first, then the project with its dev extras

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[cpu,dev]"
	touch $@

test: install  ## run the test suite (offline, tiny models)
	$(PYTHON) -m pytest -q

models: install  ## train every model into $(ARTIFACTS)/ (PRESET=tiny|cpu|gpu, DATA_DIR=...)
	$(PYTHON) -m training --preset $(PRESET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out $(ARTIFACTS) $(TRAIN_ARGS)

clean-models:  ## delete $(ARTIFACTS)/
	rm -rf $(ARTIFACTS)

export: install  ## export $(ARTIFACTS)/ to ONNX (fp32, int8, fp16) with parity checks, into $(ARTIFACTS)/onnx/
	$(PYTHON) -m export --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

bench: install  ## CPU benchmark PyTorch vs ONNX Runtime on $(ARTIFACTS)/ -> reports/bench/
	$(PYTHON) -m export.bench --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/bench

# ---- service --------------------------------------------------------------------------------
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: serve

# File targets, so that `make serve` builds only what is missing: the trained models (their
# stage records, written when a stage completes: manifest.json is written before training), then
# the export. Order-only (|): retraining or exporting again is an explicit `make models`/`make export`.
$(ARTIFACTS)/classifier/stage.json $(ARTIFACTS)/generator/stage.json &: | $(VENV)/.installed
	$(MAKE) models

$(ARTIFACTS)/onnx/parity.json: | $(ARTIFACTS)/classifier/stage.json $(ARTIFACTS)/generator/stage.json
	$(MAKE) export

serve: install $(ARTIFACTS)/onnx/parity.json  ## serve the API on $(HOST):$(PORT) (builds missing models and export first)
	GLOWING_ARTIFACTS=$(ARTIFACTS) $(VENV)/bin/bentoml serve --host $(HOST) --port $(PORT)

# ---- load test ------------------------------------------------------------------------------
.PHONY: loadtest soak

loadtest: install $(ARTIFACTS)/onnx/parity.json  ## Locust ladder (batching on/off, onnx/torch, int8/fp32) -> reports/loadtest/ (about 8 min)
	$(PYTHON) -m loadtests.run --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/loadtest

soak: install $(ARTIFACTS)/onnx/parity.json  ## 11 min of Locust at the saturation load, RSS of every server process -> reports/soak/ (about 12 min)
	$(PYTHON) -m loadtests.soak --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/soak
