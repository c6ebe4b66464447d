# async-pay tasks. `just --list` shows them all.

export CARGO_PROFILE_DEV_DEBUG := "line-tables-only"

# List the recipes.
default:
    @just --list

# Run the HTTP API against the local services (`migrate` first: only it creates the database).
serve *ARGS:
    cargo run --release -- migrate {{ARGS}}
    cargo run --release -- serve {{ARGS}}

# Apply the database migrations.
migrate:
    cargo run --release -- migrate

# Run every test (unit and integration) against the local PostgreSQL and RabbitMQ.
test *ARGS:
    cargo nextest run {{ARGS}}

# Only the 3-node RabbitMQ cluster test (part of `just test`): kills and hangs nodes under load and prints how long the pipeline stalled (about 2 minutes).
test-cluster *ARGS:
    cargo nextest run -E 'test(/^cluster::/)' {{ARGS}}

# Benchmark against the local services (issue 6): `just bench`, or `just bench --quick` (CI).
bench *ARGS:
    python3 bench/bench.py {{ARGS}}

# Fuzz the API with schemathesis against /openapi.json of a real serve (EXAMPLES per operation; CI runs it).
schemathesis EXAMPLES="25":
    bash scripts/schemathesis.sh {{EXAMPLES}}

# Fuzz the request parser with libFuzzer for SECONDS (installs cargo-fuzz if missing; not in CI).
fuzz SECONDS="60":
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run payment_body -- -max_total_time={{SECONDS}}

# Format the code.
fmt:
    cargo fmt --all

# Check formatting and run clippy with warnings as errors (as CI does).
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings

# Regenerate src/db/schema.rs from the migrations (needs diesel_cli).
schema:
    diesel migration run --database-url "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/async_pay}"
    diesel print-schema --database-url "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/async_pay}" > src/db/schema.rs

# Run every role locally (migrate, then serve, relay, consume, dlq-watch) against the local services; Ctrl-C stops them all.
run *ARGS:
    ./scripts/run-local.sh {{ARGS}}

# List the newest dead letters (`just dlq list --limit 20`), or replay them (`just dlq replay 7`, `just dlq replay --all`).
dlq *ARGS:
    cargo run --release -- dlq {{ARGS}}

# Build the image and start the whole stack in containers, with Prometheus and Grafana; needs a Docker engine.
up:
    docker compose --profile observability up -d --build
    @just _urls

# Like `up`, but the relay runs as `relay --once` every minute (cron mode) instead of continuously.
up-cron:
    docker compose --profile cron --profile observability up -d --build --scale relay=0
    @just _urls

_urls:
    @echo "API:         http://localhost:${API_PORT:-8000}/health   (metrics: serve:9100 on the compose network)"
    @echo "RabbitMQ UI: http://localhost:${RABBITMQ_UI_PORT:-15672}"
    @echo "Prometheus:  http://localhost:${PROMETHEUS_PORT:-9090}   (alerts: /alerts, targets: /targets)"
    @echo "Grafana:     http://localhost:${GRAFANA_PORT:-3000}   (admin / \$GRAFANA_PASSWORD, default admin; dashboard async-pay)"

# Like `up`, but RabbitMQ is a 3-node cluster (profile `cluster`) with two relays and three consumers given all three nodes.
up-cluster:
    docker compose --profile cluster --profile observability up -d --build postgres migrate serve rabbitmq-1 rabbitmq-2 rabbitmq-3 relay-cluster consume-cluster dlq-watch-cluster prometheus grafana
    @echo "API:         http://localhost:${API_PORT:-8000}/health   (metrics: /metrics)"
    @echo "RabbitMQ UI: http://localhost:${RABBITMQ_CLUSTER_UI_PORT:-15673}   (node 1 of the cluster)"
    @echo "Prometheus:  http://localhost:${PROMETHEUS_PORT:-9090}"
    @echo "Grafana:     http://localhost:${GRAFANA_PORT:-3000}"

# Stop and remove the stack's containers (the data volumes stay).
down:
    docker compose --profile cron --profile cluster --profile observability down --remove-orphans

# Follow the stack's logs (all services, or the ones named: `just logs consume`).
logs *SERVICES:
    docker compose --profile cron --profile cluster --profile observability logs -f {{SERVICES}}

# Stop the stack and delete its volumes (the database, RabbitMQ's, Prometheus' and Grafana's data).
clean:
    docker compose --profile cron --profile cluster --profile observability down -v --remove-orphans

# What CI checks of the container setup without an engine: compose.yaml, the image's build command, a smoke run of the binary.
check-image:
    bash deploy/check.sh

# Alert rules (promtool unit tests) and dashboard against a real Prometheus scraping every role of the real binary (CI runs it).
prometheus-check:
    python3 scripts/prometheus-check.py
