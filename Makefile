# Set-up is automatic: every target that needs the virtual environment builds it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast demo-build demo-topk demo-lora report clean lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,dev]'
	touch $@

install: $(STAMP)

## run: distill the embedded demo teachers into the student (builds the demo models on first use)
run: $(STAMP)
	$(BIN)/mopd-serve

## test: the whole test suite
test: $(STAMP)
	$(BIN)/pytest

## test-fast: skip the end-to-end runs
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

## demo-build: build (or reuse) the embedded demo models and data
demo-build: $(STAMP)
	$(BIN)/mopd build-demo

clean:
	rm -rf $(VENV) runs .pytest_cache

## demo-topk: the embedded demo trained with topk_forward_kl on both teachers' blended top-20 (own teacher weighted 19:1), then its report PNG
demo-topk: export MOPD_STATE_DIR ?= runs/demo-topk
demo-topk: $(STAMP)
	MOPD_LOSS_FN=topk_forward_kl MOPD_TOPK=20 MOPD_TOPK_BLEND=all MOPD_TOPK_ROUTE_WEIGHT=19 \
	MOPD_EVAL_EVERY_STEPS=50 $(BIN)/mopd-serve
	$(BIN)/mopd report $(MOPD_STATE_DIR)

## demo-lora: the demo-topk run with a rank-16 LoRA student (merged weights published), then its report PNG
demo-lora: export MOPD_STATE_DIR ?= runs/demo-lora
demo-lora: $(STAMP)
	MOPD_LORA_RANK=16 MOPD_LORA_ALPHA=32 MOPD_LEARNING_RATE=0.001 \
	MOPD_LOSS_FN=topk_forward_kl MOPD_TOPK=20 MOPD_TOPK_BLEND=all MOPD_TOPK_ROUTE_WEIGHT=19 \
	MOPD_EVAL_EVERY_STEPS=50 $(BIN)/mopd-serve
	$(BIN)/mopd report $(MOPD_STATE_DIR)

## report: draw the per-route curves of the run in MOPD_STATE_DIR (default runs/mopd) into report.png there
report: $(STAMP)
	$(BIN)/mopd report $(or $(MOPD_STATE_DIR),runs/mopd)

.PHONY: prometheus-check deploy-lint
## prometheus-check: run every dashboard query against Prometheus scraping a short mopd-serve run (installs Debian's prometheus as root)
prometheus-check: $(STAMP)
	$(BIN)/python scripts/prometheus_check.py

## deploy-lint: lint the YAML under deploy/ and validate the Kubernetes manifests against their schemas
deploy-lint: $(STAMP)
	$(BIN)/yamllint --strict -c deploy/.yamllint deploy/
	$(BIN)/kubernetes-validate --strict deploy/k8s/*.yaml
	$(BIN)/hadolint deploy/Dockerfile

.PHONY: bench
## bench: simulated-deployment benchmarks of the pipeline; the last line is a JSON object of figures
bench: $(STAMP)
	$(BIN)/python bench/run.py

.PHONY: e2e
## e2e: distill the trained demo teachers into the student through three loopback model servers over HTTP (MOPD_BACKEND=openai)
e2e: $(STAMP)
	$(BIN)/python -m mopd.modelserver.loopback --state-dir runs/e2e

.PHONY: chaos
## chaos: SIGKILL and restart mopd-serve 20 times while its teachers fail; the last line is a JSON object of row counts
chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py
