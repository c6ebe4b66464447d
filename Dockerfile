# syntax=docker/dockerfile:1
# The async-pay image: one binary, every role. Containers pick their role with the subcommand
# (`serve`, `relay`, `consume`, `dlq-watch`, `migrate`, …); compose.yaml runs the whole stack.
#
#   docker build -t async-pay .
#   docker run --rm -p 8000:8000 -e ASYNC_PAY__SERVER__BIND=0.0.0.0:8000 \
#     -e ASYNC_PAY__MERCHANTS='[{name = "shop", api_key = "…", webhook_secret = "whsec_…"}]' \
#     -e DATABASE_URL=… -e AMQP_URL=… async-pay serve
# (without merchants of its own, serve refuses to listen on 0.0.0.0: the demo key is public)

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build: the Rust toolchain, the same build command CI runs (deploy/build-binary.sh) --------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the target directory between builds, so a code
# change rebuilds in seconds instead of minutes. The binary is copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    ./deploy/build-binary.sh /out

# --- runtime: slim Debian of the same release (same glibc), non-root, the binary only ----------
# The binary links only libc, libm and libgcc_s (PostgreSQL and TLS are pure Rust; webhook TLS
# roots are compiled in), so nothing is installed on top of the base image.
FROM debian:${DEBIAN_RELEASE}-slim
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin async-pay
COPY --from=build /out/async-pay /usr/local/bin/async-pay
USER 10001:10001
ENV RUST_LOG=info
EXPOSE 8000
# For the default command, `serve`: asks GET /health on server.bind (no curl in this image).
# Containers running another role disable it (compose.yaml does).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["async-pay", "healthcheck"]
ENTRYPOINT ["async-pay"]
CMD ["serve"]
