#!/usr/bin/env bash
# The README's quick start, first command, as a new user types it: `cargo run -- dev`, then the
# README's own curl example (taken from README.md, not copied here). Passes when the payment is
# final and its webhook attempted, and Ctrl-C stops everything cleanly. Run by CI (.ci/run).
# Afterwards it drops the database `dev` created (async_pay), as tests do with theirs; one that
# existed before (someone's `just run`) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

api=http://127.0.0.1:8000
key=secret-api-key
log=target/quickstart.log
mkdir -p target

if (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null; then
  echo "port 8000 is taken: the quick start needs it" >&2
  exit 1
fi

existed=$(psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT count(*) FROM pg_database WHERE datname = 'async_pay'")

# Its own process group, so that the Ctrl-C below reaches cargo and async-pay, as a terminal's
# would.
setsid cargo run -- dev >"$log" 2>&1 &
pid=$!
stopped=no
stop() {
  if [ "$stopped" = no ]; then
    stopped=yes
    kill -INT -- -"$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- -"$pid" 2>/dev/null || true
  fi
}
fail() {
  echo "quick start: $*" >&2
  echo "--- $log (last 40 lines)" >&2
  tail -n 40 "$log" >&2
  exit 1
}
trap stop EXIT

echo "cargo run -- dev (log: $log)"
for _ in $(seq 1 600); do
  curl -sf "$api/health" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || fail "cargo run -- dev exited before the API answered"
  sleep 1
done
curl -sf "$api/health" >/dev/null || fail "the API did not answer /health within 600 s"

# README.md, section "Create a payment": the first ```sh block after the heading.
example=$(awk '/^### Create a payment/{f=1} f && /^```sh/{g=1; next} g && /^```/{exit} g' README.md)
[ -n "$example" ] || fail "no curl example under '### Create a payment' in README.md"
echo "$example"
answer=$(bash -c "$example")
echo "$answer"
id=$(grep -o '"payment_id":"[^"]*"' <<<"$answer" | head -n1 | cut -d'"' -f4)
[ -n "$id" ] || fail "the curl example did not answer a payment_id"

# GET, as README's "Fetch a payment" shows, until the payment is final and its webhook attempted
# (example.com does not answer without internet: the attempt is recorded with its error).
state=""
for _ in $(seq 1 60); do
  payment=$(curl -s "$api/api/v1/payments/$id" -H "X-API-Key: $key")
  state=$(python3 -c 'import json,sys; p=json.load(sys.stdin); print(p["status"], p["webhook"]["attempts"])' <<<"$payment")
  case "$state" in
    "succeeded "[1-9]* | "failed "[1-9]*) break ;;
  esac
  sleep 1
done
case "$state" in
  "succeeded "[1-9]* | "failed "[1-9]*) echo "payment $id: $state webhook attempt(s)" ;;
  *) fail "payment $id is not final with a webhook attempt after 60 s: $state" ;;
esac
attempts=$(curl -s "$api/api/v1/payments/$id/webhook-attempts" -H "X-API-Key: $key")
echo "webhook attempts: $attempts"

# Ctrl-C.
stop
grep -q "async-pay dev stopped" "$log" || fail "Ctrl-C did not stop async-pay dev cleanly"
echo "Ctrl-C: async-pay dev stopped"
if [ "$existed" = 0 ]; then
  psql -q -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS async_pay WITH (FORCE)'
fi
echo "quick start: ok"
