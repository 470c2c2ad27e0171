# inferpool: the README's commands. Everything installs itself under .cache/ (see scripts/setup.sh).
SHELL := /bin/bash
VENV := .cache/venv/bin
CARGO ?= cargo

.PHONY: setup run run-sidecar test fuzz soak lint fmt crd bench bench-sidecar bench-cache bench-autoscaling bench-pipeline eval-copies model clean-model autoscaling-plots

## setup: ONNX Runtime library, Python tools, redis-server, the default model (idempotent)
setup:
	@scripts/setup.sh

## run: the whole system locally: control plane, operator, examples/cpu-pool.yaml; Ctrl-C stops it
run: setup
	scripts/run-local.sh

## run-sidecar: one sidecar on 127.0.0.1:8080 (admin 127.0.0.1:9090) serving the default model
run-sidecar: setup
	$(CARGO) run --release -p inferpool-sidecar -- --data-dir .cache/data $(ARGS)

## test: the whole test suite (Rust, the model scripts, the Helm chart, 30 s of each fuzz target)
test: setup
	$(CARGO) test --workspace
	$(VENV)/python -m pytest -q models/
	INFERPOOL_REQUIRE_OPERATOR=1 $(VENV)/python -m pytest -q charts/tests
	scripts/fuzz.sh 30

## fuzz: every fuzz target for FUZZ_SECONDS each (default 600); findings in fuzz/artifacts/
fuzz: setup
	scripts/fuzz.sh $(or $(FUZZ_SECONDS),600)

## soak: an hour of mixed traffic against a release sidecar with Redis (SOAK_SECONDS, SOAK_RATE); report in docs/benchmarks/soak.md
soak: setup
	$(CARGO) build --release -p inferpool-sidecar --bins
	$(VENV)/python scripts/soak.py

## lint: formatting and clippy, as CI checks them
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## crd: regenerate crds/inferencepool.yaml (and the chart's copy) from the types (tests fail while either is stale)
crd:
	$(CARGO) run -q -p inferpool-crds --bin crdgen > crds/inferencepool.yaml
	cp crds/inferencepool.yaml charts/inferpool/crds/inferencepool.yaml

## bench: benchmarks; reports go to docs/benchmarks/
bench: bench-sidecar bench-cache bench-autoscaling bench-pipeline

bench-sidecar: setup
	scripts/bench-sidecar.sh

## bench-cache: cache-miss vs memory, disk and Redis hits; report in docs/benchmarks/cache.md
bench-cache: setup
	scripts/bench-cache.sh

## bench-pipeline: decode limit per JPEG decoder, HTTP with reduced and full decoding, 10x overload; report in docs/benchmarks/pipeline.md
bench-pipeline: setup
	scripts/bench-pipeline.sh

## bench-autoscaling: operator CPU/RSS with 100 pools, SLA breach -> decision -> ready replica; report in docs/benchmarks/autoscaling.md
bench-autoscaling: setup
	scripts/bench-autoscaling.sh

## eval-copies: recall per copy transform and false-match rate of a release sidecar on photos apart from the threshold's; report in docs/models.md
eval-copies: setup
	$(CARGO) build --release -p inferpool-sidecar --bin inferpool-sidecar
	$(VENV)/python scripts/eval_copies.py --mode robust --out docs/benchmarks/copies-robust.json
	$(VENV)/python scripts/eval_copies.py --mode global --out docs/benchmarks/copies-global.json

## model: regenerate the default model's variants (after changing convert.py)
model: setup
	$(VENV)/python models/effnet_lite0/convert.py --out models/effnet_lite0

## autoscaling-plots: rerun the autoscaler's simulated scenarios and redraw docs/autoscaling/*.svg
autoscaling-plots:
	$(CARGO) run -q -p inferpool-operator --example autoscaling_plots
