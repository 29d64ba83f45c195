#!/usr/bin/env bash
# The whole test suite: lint, then every test against a DynamoDB-compatible emulator that
# this script starts on a free loopback port and always stops again, the end-to-end and
# browser tests, and the API contract (scripts/contract.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
log_dir=.tmp
mkdir -p "$log_dir"

echo "==> formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> SAM template lint"
"$VENV/bin/cfn-lint" infra/template.yaml
SAM_CLI_TELEMETRY=0 "$VENV/bin/sam" validate --lint --template-file infra/template.yaml --region us-east-1

port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "==> starting the DynamoDB/SQS emulator on 127.0.0.1:$port"
"$VENV/bin/python" scripts/emulator.py "$port" >"$log_dir/emulator.log" 2>&1 &
emulator=$!
trap 'kill "$emulator" 2>/dev/null || true; wait "$emulator" 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$emulator" 2>/dev/null; then
    echo "the emulator exited; its log:" >&2
    cat "$log_dir/emulator.log" >&2
    exit 1
  fi
  sleep 0.2
done
curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" || {
  echo "the emulator did not become ready; its log:" >&2
  cat "$log_dir/emulator.log" >&2
  exit 1
}

echo "==> tests"
DYNAMODB_ENDPOINT="http://127.0.0.1:$port" cargo test --workspace --locked

echo "==> end to end: the real function binaries under cargo lambda watch"
PATH="$PWD/$VENV/bin:$PATH" DYNAMODB_ENDPOINT="http://127.0.0.1:$port" "$VENV/bin/python" scripts/e2e.py

echo "==> the API contract: schemathesis against the local system"
VENV="$VENV" scripts/contract.sh

echo "==> browser test of the simulated checkout page"
scripts/install-browser.sh
cargo build --locked -p tally-local
"$VENV/bin/python" scripts/browser_test.py target/debug/tally-local
echo "==> all tests passed"
