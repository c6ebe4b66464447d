#!/usr/bin/env bash
# Runs schemathesis against /openapi.json of a real `async-pay serve` (bounded number of
# examples): zero 5xx and zero responses that contradict the document.
#
# Uses the debug binary that `just test` builds (set ASYNC_PAY_BIN to use another), a scratch
# database that is dropped afterwards, and a free local port.
#
# `positive_data_acceptance` is excluded: some rules cannot be expressed in the schema (a webhook
# URL must parse and must not point to a private network, a cursor must be one this API issued),
# so a schema-valid request may rightly get a documented 422.
set -euo pipefail
cd "$(dirname "$0")/.."

examples="${1:-25}"
bin="${ASYNC_PAY_BIN:-target/debug/async-pay}"
[ -x "$bin" ] || cargo build --quiet
command -v st >/dev/null || pip install --quiet schemathesis

db="ap_schemathesis_$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db" ASYNC_PAY__SERVER__BIND="127.0.0.1:$port"
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || true
  rm -f "$log"
}
trap cleanup EXIT
# serve never creates a database; migrate does.
"$bin" migrate >"$log" 2>&1 || { cat "$log"; exit 1; }
"$bin" serve >>"$log" 2>&1 &
pid=$!

st run "http://127.0.0.1:$port/openapi.json" \
  --wait-for-schema 60 \
  -H "X-API-Key: secret-api-key" \
  --max-examples "$examples" \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --seed 20261125 \
  || { echo "--- serve log"; tail -n 50 "$log"; exit 1; }
grep -q " 500 " "$log" && { echo "serve logged a 500:"; grep " 500 " "$log"; exit 1; }
echo "schemathesis: no 5xx, no response contradicting the document"
