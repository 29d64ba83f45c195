#!/usr/bin/env bash
# The whole test suite: lint, then every test against two DynamoDB servers that this script
# starts on free loopback ports and always stops again (moto, which also serves SQS, and
# AWS's own DynamoDB Local, installed by scripts/dynamodb-local.sh), the end-to-end and
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

free_port() {
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
echo "==> starting the DynamoDB/SQS emulator on 127.0.0.1:$port"
"$VENV/bin/python" scripts/emulator.py "$port" >"$log_dir/emulator.log" 2>&1 &
emulator=$!
dynamodb_local=
stop_servers() {
  kill "$emulator" $dynamodb_local 2>/dev/null || true
  wait "$emulator" $dynamodb_local 2>/dev/null || true
}
trap stop_servers EXIT

scripts/dynamodb-local.sh --install
local_port=$(free_port)
echo "==> starting DynamoDB Local on 127.0.0.1:$local_port"
scripts/dynamodb-local.sh "$local_port" >"$log_dir/dynamodb-local.log" 2>&1 &
dynamodb_local=$!

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

# DynamoDB Local answers 400 to a plain GET once it is up.
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$local_port/" 2>/dev/null || true)
  if [ "$code" = 400 ]; then
    break
  fi
  if ! kill -0 "$dynamodb_local" 2>/dev/null; then
    echo "DynamoDB Local exited; its log:" >&2
    cat "$log_dir/dynamodb-local.log" >&2
    exit 1
  fi
  sleep 0.2
done
[ "$code" = 400 ] || {
  echo "DynamoDB Local did not become ready; its log:" >&2
  cat "$log_dir/dynamodb-local.log" >&2
  exit 1
}

echo "==> tests"
DYNAMODB_ENDPOINT="http://127.0.0.1:$port" DYNAMODB_LOCAL_ENDPOINT="http://127.0.0.1:$local_port" \
  cargo test --workspace --locked

echo "==> end to end: the real function binaries under cargo lambda watch"
PATH="$PWD/$VENV/bin:$PATH" DYNAMODB_ENDPOINT="http://127.0.0.1:$port" "$VENV/bin/python" scripts/e2e.py

echo "==> the API contract: schemathesis against the local system"
VENV="$VENV" scripts/contract.sh

echo "==> browser test of the simulated checkout page"
scripts/install-browser.sh
cargo build --locked -p tally-local
"$VENV/bin/python" scripts/browser_test.py target/debug/tally-local

echo "==> the local runner killed with SIGKILL mid-delivery loses no purchase"
"$VENV/bin/python" scripts/crash_test.py target/debug/tally-local
echo "==> all tests passed"
