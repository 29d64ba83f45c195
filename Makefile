# Tally: `make run` starts the local system, `make test` runs the whole suite.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3

.PHONY: run test lint bench fmt clean tools

## Build and start every HTTP route on 127.0.0.1:8080 (PORT overrides), embedded store in .tally/.
run:
	cargo run --locked -p tally-local

## Install test tools, start the emulator, lint, run every test, stop the emulator.
test: tools
	VENV=$(VENV) scripts/test.sh

## Python tools (emulator) in a local virtualenv, reinstalled when requirements change.
tools: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all

## Criterion benchmarks of the ledger engine and the embedded store.
bench:
	cargo bench --locked -p tally --bench ledger

clean:
	cargo clean
	rm -rf $(VENV) .tmp
