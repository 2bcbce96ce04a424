#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, docs, every test
# (unit, integration, property, doctests), and the Cargo feature matrix.
#
#   ci/test.sh
#
# Needs only the Rust toolchain (with rustfmt and clippy), cargo-nextest and
# python3. Exits non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "golden frames match their independent generator"
python3 tests/golden/gen_frames.py | diff -u tests/golden/frames.txt -

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy, all targets, all features"
cargo clippy --locked --all-targets --all-features -- -D warnings

step "rustdoc with warnings denied"
RUSTDOCFLAGS=-Dwarnings cargo doc --locked --no-deps --all-features

step "tests, all features"
cargo nextest run --locked --all-features --profile ci

step "doctests, all features"
cargo test --locked --doc --all-features

step "benches run (each once, in test mode)"
cargo test --locked --all-features --benches

for backend in ipc-interprocess ipc-tokio ipc-legacy; do
    step "feature matrix: $backend alone (with the CLI) passes every test that applies to it"
    cargo nextest run --locked --no-default-features --features "$backend,cli" --profile ci
done

step "feature matrix: a single-backend library pulls in no other backend's socket code"
deps_of() { cargo tree --locked --no-default-features --features "$1" -e normal --prefix none; }
if grep -q '^interprocess ' <<<"$(deps_of ipc-tokio)"; then
    echo "ipc-tokio alone must not depend on interprocess" >&2
    exit 1
fi
if grep -qE '^(interprocess|mio) ' <<<"$(deps_of ipc-legacy)"; then
    echo "ipc-legacy alone must depend on neither interprocess nor mio (tokio's sockets)" >&2
    exit 1
fi

step "feature matrix: no backend feature fails with a message naming the features"
if cargo check --locked --no-default-features --message-format short >target/no-backend.log 2>&1; then
    echo "building with no backend feature must fail" >&2
    exit 1
fi
grep -q 'needs at least one transport backend.*ipc-interprocess.*ipc-tokio.*ipc-legacy' target/no-backend.log || {
    cat target/no-backend.log >&2
    echo "the no-backend build failed without the expected compile_error! message" >&2
    exit 1
}

step "all checks passed"
