# Two commands do all set-up on a fresh machine: `make train` (the quickstart demo) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vocdet-installed

.PHONY: setup train test test-fast bench bench-predict lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## The main job on the embedded default: synthesize VOC-format data, train yolov8n on the CPU, evaluate.
train: setup
	$(BIN)/vocdet train --config configs/quickstart.yaml

## The test suite (CPU, no network) with coverage.
test: setup
	$(BIN)/python -m pytest --cov=vocdet --cov-report=term-missing:skip-covered

## Unit tests only (seconds).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

## vocdet vs Ultralytics' trainer side by side (minutes; not part of `make test`); writes runs/bench/results.json.
bench: setup
	$(BIN)/python -m vocdet.bench

## Inference latency/throughput: Detector (PyTorch, ONNX Runtime) vs Ultralytics' YOLO.predict (needs `make train`).
bench-predict: setup
	$(BIN)/python -m vocdet.bench_predict

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data/synthetic .pytest_cache .ruff_cache .coverage
