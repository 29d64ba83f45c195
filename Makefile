# Tally: `make run` starts the local system, `make test` runs the whole suite.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3

.PHONY: run test soak contract lint bench fmt clean tools build deploy measure

## Build and start every HTTP route on 127.0.0.1:8080 (PORT overrides), embedded store in .tally/.
run:
	cargo run --locked -p tally-local

## Install test tools, start the emulator, lint, run every test, stop the emulator.
test: tools
	VENV=$(VENV) scripts/test.sh

## The API contract only: the local system under schemathesis (every check, every kind of caller).
contract: tools
	VENV=$(VENV) scripts/contract.sh

## Longer runs than `make test` has time for; one command a line.
soak: tools
	VENV=$(VENV) MAX_EXAMPLES=300 scripts/contract.sh
	PROPTEST_CASES=2000 cargo test --locked -p tally-tests --test suite -- contract::
	TALLY_SIM_SEEDS=20000 TALLY_SIM_STEPS=40 cargo test --locked -p tally-tests --test suite -- simulation

## Python tools (emulator, schemathesis) in a local virtualenv, reinstalled when requirements change.
tools: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## Lambda bundles for arm64 in target/lambda/ (adds the aarch64 Rust target; zig comes with cargo-lambda).
build: tools
	rustup target add aarch64-unknown-linux-gnu
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --arm64 --locked

## Build with SAM and deploy the stack; the first run asks for parameters and saves them.
deploy: tools
	cd infra && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" SAM_CLI_TELEMETRY=0 sam build
	cd infra && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" SAM_CLI_TELEMETRY=0 sam deploy --guided

## Release binary sizes and cold start to the first runtime API poll of every function,
## beside a probe that builds the same clients and nothing else (docs/performance.md).
measure:
	cargo build --release --locked -p credits-api -p purchases -p stripe-webhook -p billing-events \
	  -p credit-refresh -p refunds -p refunds-worker -p support-intake -p support-forwarder
	cargo build --release --locked -p tally --example coldstart_probe
	$(PYTHON) scripts/coldstart.py target/release

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt:
	cargo fmt --all

## Criterion benchmarks: the ledger engine and the embedded store; webhook verification and
## parsing beside stripe-node's constructEvent on the same delivery (needs node and npm);
## one hot team account on DynamoDB Local beside the server's own ceiling (needs Java).
bench: tools
	cargo bench --locked -p tally --features local --bench ledger
	scripts/bench-hot-account.sh
	cargo bench --locked -p stripe-webhook --bench verify
	npm install --silent --no-save --no-package-lock --prefix .tmp/node-bench stripe@23.2.0
	STRIPE_NODE=$(CURDIR)/.tmp/node-bench/node_modules/stripe node scripts/bench_webhook_node.js

clean:
	cargo clean
	rm -rf $(VENV) .tmp
