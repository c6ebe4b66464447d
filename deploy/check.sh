#!/usr/bin/env bash
# Checks the container setup on a machine without a Docker engine (CI runs it; `just check-image`):
#
#  1. compose.yaml is valid for `docker-compose config` (Debian's package, installed if missing),
#     without profiles, with the cron profile, with the observability profile (Prometheus and
#     Grafana; their own files are checked by `just prometheus-check`) and with the cluster
#     profile; every service that runs the image calls a subcommand the binary has, and the
#     cluster profile's roles are given all three nodes, which deploy/rabbitmq-cluster.conf
#     lists for peer discovery.
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
docker-compose -f compose.yaml --profile cluster config -q
all_profiles=(--profile cron --profile observability --profile cluster)
services=$(docker-compose -f compose.yaml "${all_profiles[@]}" config --services)
for s in postgres rabbitmq migrate serve relay consume dlq-watch relay-cron prometheus grafana \
  rabbitmq-1 rabbitmq-2 rabbitmq-3 relay-cluster consume-cluster dlq-watch-cluster; do
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
# The cluster profile: 2 relays and 3 consumers (and dlq-watch), each given the three nodes.
docker-compose -f compose.yaml --profile cluster config | python3 -c '
import sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
nodes = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
for name, replicas in [("relay-cluster", 2), ("consume-cluster", 3), ("dlq-watch-cluster", 1)]:
    s = services[name]
    got = (s.get("deploy") or {}).get("replicas", 1)
    assert got == replicas, f"{name}: {got} replicas, expected {replicas}"
    hosts = [u.split("@")[-1].split(":")[0] for u in s["environment"]["AMQP_URL"].split(",")]
    assert hosts == nodes, f"{name} is given {hosts}, expected {nodes}"
    assert all(n in s["depends_on"] for n in nodes), f"{name} does not wait for every node"
for n in nodes:
    assert services[n]["hostname"] == n, f"{n}: its host name makes its node name"
print("cluster profile: relays, consumers and dlq-watch are given", ", ".join(nodes))
' || fail "the cluster profile of compose.yaml is not what README: Scaling says"
for n in 1 2 3; do
  grep -qx "cluster_formation.classic_config.nodes.$n = rabbit@rabbitmq-$n" deploy/rabbitmq-cluster.conf \
    || fail "deploy/rabbitmq-cluster.conf does not list rabbit@rabbitmq-$n"
done
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
# Where the container binds 0.0.0.0:8000 (and 0.0.0.0:9100 for /metrics), this run takes free
# loopback ports.
export ASYNC_PAY__SERVER__BIND="127.0.0.1:$port"
export ASYNC_PAY__SERVER__METRICS_BIND="127.0.0.1:0"
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
