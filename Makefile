# Glowing: `make help` lists the targets.
PY        ?= python3
VENV      ?= .venv
PYTHON    := $(VENV)/bin/python
PRESET    ?= cpu
ARTIFACTS ?= artifacts
# The shared data folder where it exists; otherwise the training code falls back to the hub.
DATA_DIR  ?= $(if $(wildcard ../shared/data/imdb),../shared/data,)
TRAIN_ARGS ?=
# Which trained generator `make export` turns into the served one: finetuned (generator/) or rl (rl/, `make rl`).
GENERATOR ?= finetuned

.PHONY: help install test test-fast playground-screenshot models rl clean-models export bench bench-scoring

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv: torch==2.13.0 first, then the project with its cpu, rl, dev and bench extras

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[cpu,rl,dev,bench]"
	touch $@

test: install  ## run the whole test suite, what CI runs (offline, tiny models; about 5 min on 2 cores)
	$(PYTHON) -m pytest -q

test-fast: install  ## the inner loop: the suite without the tests marked slow (real servers, subprocesses; under a minute)
	$(PYTHON) -m pytest -q -m "not slow"

playground-screenshot: install  ## docs/playground.png for the README: the playground's headless-Chromium test on the tiny models
	GLOWING_SCREENSHOT=docs/playground.png $(PYTHON) -m pytest -q tests/test_playground.py -k chromium

models: install  ## train every model into $(ARTIFACTS)/ (PRESET=tiny|cpu|gpu, DATA_DIR=...)
	$(PYTHON) -m training --preset $(PRESET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out $(ARTIFACTS) $(TRAIN_ARGS)

rl: install  ## tune the generator with RL (classifier reward) -> $(ARTIFACTS)/rl, reports/rl (cpu: about 6.5 min)
	$(PYTHON) -m training --preset $(PRESET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out $(ARTIFACTS) --stages rl,eval-rl --set threads=1 $(TRAIN_ARGS)

clean-models:  ## delete $(ARTIFACTS)/
	rm -rf $(ARTIFACTS)

export: install  ## export $(ARTIFACTS)/ to ONNX (fp32, int8, fp16) with parity checks, into $(ARTIFACTS)/onnx/ (GENERATOR=finetuned|rl)
	$(PYTHON) -m export --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --generator $(GENERATOR)

bench: install  ## CPU benchmarks: PyTorch vs ONNX Runtime, then decoding (our loop, the engine, CTranslate2) on $(ARTIFACTS)/ -> reports/bench/
	$(PYTHON) -m export.bench --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/bench
	$(PYTHON) -m export.bench_decode --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/bench

bench-scoring: install  ## how /score texts are grouped into classifier calls, in ms/text (fp32, int8, fp16) -> reports/bench/
	$(PYTHON) -m export.bench_scoring --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/bench

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
# LOADTEST_WORKERS: 0 = one Locust process; N >= 2 = Locust's distributed mode, a master and N workers
# (for when one Locust process, one core, cannot generate the load; docs/LOADTESTS.md).
LOADTEST_WORKERS ?= 0

.PHONY: loadtest soak bench-serving bench-reviews

loadtest: install $(ARTIFACTS)/onnx/parity.json  ## Locust ladder (batching on/off, onnx/torch, int8/fp32) -> reports/loadtest/ (about 8 min; LOADTEST_WORKERS=N)
	$(PYTHON) -m loadtests.run --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --workers $(LOADTEST_WORKERS) --out reports/loadtest

bench-serving: install $(ARTIFACTS)/onnx/parity.json  ## HTTP: the serving engine vs adaptive batching (lone latency after a burst, /generate ladder, TTFT, abandoned requests) -> reports/serving/ (about 9 min)
	$(PYTHON) -m loadtests.serving --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/serving

bench-reviews: install $(ARTIFACTS)/onnx/parity.json  ## HTTP: /reviews as a pipeline vs in rounds (lone vs in-process, 1 and 16 clients, waste at min_positive 0.9) -> reports/reviews/ (about 6 min)
	$(PYTHON) -m loadtests.reviews --artifacts $(ARTIFACTS) --out reports/reviews

soak: install $(ARTIFACTS)/onnx/parity.json  ## 11 min of Locust at the saturation load, RSS of every server process -> reports/soak/ (about 12 min)
	$(PYTHON) -m loadtests.soak --artifacts $(ARTIFACTS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out reports/soak

# ---- deployment: Bentos, containers (docs/OPERATIONS.md) -----------------------------------
# VARIANT: gpu (bentofile.yaml, onnxruntime-gpu with CUDA 13 from pip wheels), cpu (bentofile.cpu.yaml), all.
VARIANT   ?= all
MODEL_TAG ?=
IMAGE_TAG ?= latest
VARIANTS   = $(if $(filter all,$(VARIANT)),gpu cpu,$(VARIANT))
BENTOFILE_gpu = bentofile.yaml
BENTOFILE_cpu = bentofile.cpu.yaml

.PHONY: bento container

# With MODEL_TAG the models come from the store: no artifacts needed (no training, no export).
bento: install $(if $(MODEL_TAG),,$(ARTIFACTS)/onnx/parity.json)  ## Bentos with the models packed (VARIANT=gpu|cpu|all; MODEL_TAG=... else $(ARTIFACTS)' export, registered first)
	@tag="$(MODEL_TAG)"; \
	if [ -z "$$tag" ]; then tag=$$($(PYTHON) -m export.register --artifacts $(ARTIFACTS) --quiet) || exit 1; fi; \
	for v in $(VARIANTS); do \
	  f=$$(case $$v in gpu) echo $(BENTOFILE_gpu);; cpu) echo $(BENTOFILE_cpu);; *) echo "VARIANT=$$v: gpu, cpu or all" >&2; exit 2;; esac) || exit 2; \
	  echo "building the $$v Bento from $$f with $$tag"; \
	  GLOWING_MODEL_TAG=$$tag GLOWING_DEVICE=$$(test $$v = gpu && echo cuda || echo cpu) \
	    $(VENV)/bin/bentoml build -f $$f || exit 1; \
	done

container:  ## docker image of the latest Bento per VARIANT, tagged glowing-VARIANT:$(IMAGE_TAG) (needs Docker)
	@docker info >/dev/null 2>&1 || { \
	  echo "make container: no Docker engine here ('docker info' fails). On a machine with Docker (and the Bento from 'make bento'," >&2; \
	  echo "  moved with 'bentoml export glowing-gpu:latest glowing-gpu.bento' + 'bentoml import glowing-gpu.bento'), run:" >&2; \
	  for v in $(VARIANTS); do echo "  bentoml containerize glowing-$$v:latest --image-tag glowing-$$v:$(IMAGE_TAG)" >&2; done; \
	  exit 1; }
	for v in $(VARIANTS); do $(VENV)/bin/bentoml containerize glowing-$$v:latest --image-tag glowing-$$v:$(IMAGE_TAG) || exit 1; done
