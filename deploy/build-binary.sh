#!/usr/bin/env bash
# THE release build of the async-pay binary. The Dockerfile's build stage runs this script and CI
# runs it too (deploy/check.sh), so CI builds the binary exactly as the image does: same command,
# same flags, same locked dependencies, no features beyond the defaults.
#
#   deploy/build-binary.sh OUT_DIR    # builds, then copies the binary to OUT_DIR/async-pay
set -euo pipefail
out=${1:?usage: deploy/build-binary.sh OUT_DIR}
cd "$(dirname "$0")/.."
cargo build --locked --release --bin async-pay
install -D -m 0755 "${CARGO_TARGET_DIR:-target}/release/async-pay" "$out/async-pay"
echo "built $out/async-pay"
