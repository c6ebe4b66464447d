#!/usr/bin/env bash
# Checks the container setup on a machine without a Docker engine (CI runs it; `just check-image`):
#
#  1. compose.yaml is valid for `docker-compose config` (Debian's package, installed if missing),
#     without profiles, with the cron profile and with the observability profile (Prometheus and
#     Grafana; their own files are checked by `just prometheus-check`), and every service that
#     runs the image calls a subcommand the binary has.
#  2. The binary builds exactly as the image builds it: deploy/build-binary.sh is the command the
#     Dockerfile's build stage runs. It links nothing that debian:bookworm-slim lacks.
#  3. That binary, configured like a container (deploy/config.toml, secrets from the environment),
#     migrates a throwaway database, serves, and passes the image's HEALTHCHECK command
#     (`async-pay healthcheck`); stopped, it fails it.
#
# Needs the local PostgreSQL (CHECK_DATABASE_URL, default postgres://postgres@127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n-- %s\n' "$*"; }
fail() { echo "check-image: $*" >&2; exit 1; }

log "compose.yaml (docker-compose config)"
if ! command -v docker-compose >/dev/null; then
  echo "installing Debian's docker-compose (validation only, no engine)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
docker-compose --version
# compose.yaml requires the merchants: without them it must refuse, with them it must be valid.
if env -u ASYNC_PAY__MERCHANTS docker-compose -f compose.yaml config -q 2>/dev/null; then
  fail "compose.yaml accepts a stack without ASYNC_PAY__MERCHANTS (the demo key is public)"
fi
export ASYNC_PAY__MERCHANTS='[{name = "check", api_key = "check-only-key", webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]'
docker-compose -f compose.yaml config -q
docker-compose -f compose.yaml --profile cron config -q
docker-compose -f compose.yaml --profile observability config -q
all_profiles=(--profile cron --profile observability)
services=$(docker-compose -f compose.yaml "${all_profiles[@]}" config --services)
for s in postgres rabbitmq migrate serve relay consume dlq-watch relay-cron prometheus grafana; do
  grep -qx "$s" <<<"$services" || fail "compose.yaml has no service $s"
done
# Files the containers mount from this repository exist (compose would create a missing one as
# an empty directory).
docker-compose -f compose.yaml "${all_profiles[@]}" config | python3 -c '
import os, sys, yaml
for name, s in yaml.safe_load(sys.stdin)["services"].items():
    for v in s.get("volumes", []):
        # docker-compose 1.x prints "source:target[:mode]", 2.x a mapping.
        source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if source.startswith("/") and not os.path.exists(source):
            sys.exit(f"compose.yaml: service {name} mounts {source}, which does not exist")
'
# "image-service command" lines: the subcommand each service of the image runs.
commands=$(docker-compose -f compose.yaml "${all_profiles[@]}" config | python3 -c '
import sys, yaml
for name, s in yaml.safe_load(sys.stdin)["services"].items():
    if not s.get("image", "").startswith("async-pay"):
        continue
    cmd = s.get("command") or []
    if s.get("entrypoint"):  # the cron loop: the commands it runs
        cmd = ["relay", "--once"] if "async-pay relay --once" in " ".join(cmd) else ["?"]
    print(name, " ".join(cmd))
')
echo "$commands"
grep -q 'deploy/build-binary.sh /out' Dockerfile || fail "the Dockerfile no longer builds with deploy/build-binary.sh"
grep -q 'CMD \["async-pay", "healthcheck"\]' Dockerfile || fail "the Dockerfile's HEALTHCHECK changed; update this check"

log "release build, as in the Dockerfile (deploy/build-binary.sh)"
out=$(mktemp -d)
db="ap_check_$(date +%s)_$$"
admin="${CHECK_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
serve_pid=
cleanup() {
  if [ -n "$serve_pid" ]; then kill -TERM "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  psql -q "$admin/postgres" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$out"
}
trap cleanup EXIT
started=$(date +%s)
deploy/build-binary.sh "$out"
bin="$out/async-pay"
echo "built in $(($(date +%s) - started))s, $(du -h "$bin" | cut -f1)"

log "shared libraries (the runtime image adds none)"
ldd "$bin"
extra=$(ldd "$bin" | grep -Ev 'linux-vdso|/ld-linux|lib(c|m|gcc_s|pthread|dl|rt)\.so' || true)
[ -z "$extra" ] || fail "the binary needs libraries debian:bookworm-slim does not have: $extra"

log "every subcommand compose.yaml and the HEALTHCHECK use exists"
while read -r service cmd; do
  # shellcheck disable=SC2086 # the command is words
  "$bin" $cmd --help >/dev/null || fail "service $service runs \`async-pay $cmd\`, which the binary does not know"
done <<<"$commands"
"$bin" healthcheck --help >/dev/null

log "smoke run configured like the containers"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export ASYNC_PAY_CONFIG=deploy/config.toml
export DATABASE_URL="$admin/$db"
# Where the container binds 0.0.0.0:8000, this run takes a free loopback port.
export ASYNC_PAY__SERVER__BIND="127.0.0.1:$port"
export RUST_LOG=warn
"$bin" migrate
"$bin" dlq list
"$bin" serve &
serve_pid=$!
healthy=
for _ in $(seq 1 50); do
  if "$bin" healthcheck --timeout 1s 2>/dev/null; then healthy=1; break; fi
  sleep 0.2
done
[ -n "$healthy" ] || { "$bin" healthcheck --timeout 1s || true; fail "serve never became healthy"; }
kill -TERM "$serve_pid"
wait "$serve_pid" || fail "serve did not stop cleanly on SIGTERM"
serve_pid=
if "$bin" healthcheck --timeout 1s 2>/dev/null; then fail "healthcheck passed with serve stopped"; fi
echo "container checks passed"
