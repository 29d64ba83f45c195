#!/usr/bin/env bash
# The hot-account benchmark (shared/benches/hot_account.rs) against AWS's DynamoDB Local,
# which this script starts on a free loopback port and always stops again.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
mkdir -p .tmp
scripts/dynamodb-local.sh --install
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scripts/dynamodb-local.sh "$port" >.tmp/dynamodb-local-bench.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" 2>/dev/null || true)
  [ "$code" = 400 ] && break
  sleep 0.2
done
[ "$code" = 400 ] || { echo "DynamoDB Local did not start; its log:" >&2; cat .tmp/dynamodb-local-bench.log >&2; exit 1; }
DYNAMODB_LOCAL_ENDPOINT="http://127.0.0.1:$port" cargo bench --locked -p tally --bench hot_account
