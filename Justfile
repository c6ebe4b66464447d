# async-pay tasks. `just --list` shows them all.

export CARGO_PROFILE_DEV_DEBUG := "line-tables-only"

# List the recipes.
default:
    @just --list

# Run the HTTP API against the local services (creates and migrates the database).
serve *ARGS:
    cargo run --release -- serve {{ARGS}}

# Apply the database migrations.
migrate:
    cargo run --release -- migrate

# Run every test (unit and integration) against the local PostgreSQL and RabbitMQ.
test *ARGS:
    cargo nextest run {{ARGS}}

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

# Start PostgreSQL and RabbitMQ in containers (needs a Docker engine).
up:
    docker compose up -d --build

# Stop the containers.
down:
    docker compose down

# Follow the containers' logs.
logs:
    docker compose logs -f

# Stop the containers and delete the database volume.
clean:
    docker compose down -v
