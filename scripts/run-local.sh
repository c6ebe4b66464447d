#!/usr/bin/env bash
# Runs the whole pipeline locally against the local PostgreSQL and RabbitMQ (`just run`): builds
# the release binary, applies the migrations, then starts serve, relay, consume and dlq-watch side
# by side, each log line prefixed with its role. Arguments go to every role before the
# subcommand (`just run --config my.toml`); the usual environment (DATABASE_URL, AMQP_URL,
# ASYNC_PAY__…) applies.
#
# Ctrl-C or SIGTERM stops every role with SIGTERM (each shuts down cleanly: consume finishes or
# hands back the payments in flight) and waits for them. If one role exits by itself, the others
# are stopped too and the script exits with that role's status.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin async-pay
bin="${CARGO_TARGET_DIR:-target}/release/async-pay"
"$bin" "$@" migrate

pids=()
stop_all() {
  trap - INT TERM
  if ((${#pids[@]})); then
    echo "stopping every role" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

# Metrics: serve on its API port (/metrics), the other roles each on a port of their own.
declare -A metrics_port=([serve]="" [relay]=9101 [consume]=9102 [dlq-watch]=9103)
for role in serve relay consume dlq-watch; do
  port=${metrics_port[$role]}
  # The prefixing sed ignores INT/TERM, so it keeps printing the role's shutdown lines.
  ASYNC_PAY__METRICS__BIND=${port:+127.0.0.1:$port} \
    "$bin" "$@" "$role" > >(trap '' INT TERM; exec sed -u "s/^/[$role] /") 2>&1 &
  pids+=("$!")
done
echo "running serve, relay, consume, dlq-watch (pids ${pids[*]}); metrics of relay, consume," \
  "dlq-watch on http://127.0.0.1:9101/metrics, :9102, :9103; Ctrl-C stops them all" >&2

status=0
wait -n "${pids[@]}" || status=$?
echo "a role exited (status $status); stopping the others" >&2
stop_all
exit "$status"
