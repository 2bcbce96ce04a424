#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, docs, every test
# (unit, integration, property, doctests), and the Cargo feature matrix.
#
#   ci/test.sh
#
# Needs the Rust toolchain (with rustfmt and clippy), cargo-nextest and
# python3; installs what else it uses when missing: the declared minimum
# Rust (rustup toolchain install 1.88 --profile minimal), a nightly with
# Miri (rustup toolchain install nightly --profile minimal --component
# miri) and cargo-deny (cargo install cargo-deny --locked). Exits non-zero
# on the first failing step.
#
# Run as root, it runs every test. Run as anyone else, it leaves out the
# tests that need root (tests/as_root.rs: they run processes as another
# user), says how many and why, and runs the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> [%s] %s\n' "$(date +%T)" "$*"; }

# The rust-version Cargo.toml declares.
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)

# The tests that need root, as a nextest filter.
root_only='binary(as_root)'
if [[ $(id -u) -eq 0 ]]; then
    as_user=()
else
    as_user=(-E "not $root_only")
fi

# Says, once per run of the suite, what is left out and how to include it.
left_out() { # left_out FEATURE-ARGS...
    [[ $(id -u) -eq 0 ]] && return 0
    local count
    count=$(cargo nextest list --locked "$@" -E "$root_only" --message-format oneline | wc -l)
    echo "NOTE: leaving out $count tests that need root (tests/as_root.rs runs processes as uid 65534);" \
        "run ci/test.sh as root to include them."
}

step "golden frames match their independent generator"
python3 tests/golden/gen_frames.py | diff -u tests/golden/frames.txt -

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy, all targets, all features"
cargo clippy --locked --all-targets --all-features -- -D warnings

step "rustdoc with warnings denied"
RUSTDOCFLAGS=-Dwarnings cargo doc --locked --no-deps --all-features

step "tests, all features"
left_out --all-features
cargo nextest run --locked --all-features --profile ci ${as_user[@]+"${as_user[@]}"}

if [[ $(id -u) -eq 0 ]]; then
    step "the tests that need root, from a checkout in a private (0700) directory"
    # Where a root user's checkout often is (a 0700 home, mktemp -d): the
    # processes these tests run as another user must still reach what they
    # need. The copy builds in its own target directory, inside the private
    # one, as a fresh clone would.
    private=$(mktemp -d)
    trap 'rm -rf "$private"' EXIT
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$private" -xf -
    # Only what those tests need is built there: the library, the binary
    # and tests/as_root.rs.
    (cd "$private" && CARGO_TARGET_DIR="$private/target" \
        cargo nextest run --locked --all-features --profile ci --test as_root -E "$root_only")
    rm -rf "$private"
    trap - EXIT
fi

step "the simulation: 50,000 seeded interleavings of clients, slots, budget and connections"
# (The suite above ran its default 2,000.) A failing seed prints itself;
# SIM_SEED=<n> replays it alone, SIM_SEEDS=<n> explores more.
SIM_SEEDS=50000 cargo nextest run --locked --all-features --profile ci --lib -E 'test(simulation::)' --no-capture

step "loom: the locks connections share, under every interleaving it explores"
# Its own target directory: the cfg changes every crate's build.
RUSTFLAGS="--cfg daemoneye_loom" CARGO_TARGET_DIR=target/loom \
    cargo test --locked --lib --release --all-features loom

step "Miri: the sans-I/O cores' unit tests (frame, policy, views) under the interpreter"
# Nightly with its miri component (rustup picks a nightly that has it when
# it installs one). Its own target directory, like loom's.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^miri'; then
    rustup toolchain install nightly --profile minimal --component miri
fi
MIRIFLAGS="-Zmiri-disable-isolation" CARGO_TARGET_DIR=target/miri \
    cargo +nightly miri test --locked --lib --no-default-features --features ipc-legacy \
    -- policy:: frame:: view::

step "doctests, all features"
cargo test --locked --doc --all-features

step "benches run (each once, in test mode)"
cargo test --locked --all-features --benches

# The soak tests ran above on every backend, each a minute of the same
# backend code; the matrix runs everything else.
matrix_filter='not binary(soak)'
[[ $(id -u) -eq 0 ]] || matrix_filter="$matrix_filter and not $root_only"
for backend in ipc-interprocess ipc-tokio ipc-legacy; do
    step "feature matrix: $backend alone (with the CLI) passes every test that applies to it but the soak"
    left_out --no-default-features --features "$backend,cli"
    cargo nextest run --locked --no-default-features --features "$backend,cli" --profile ci -E "$matrix_filter"
done

for backend in ipc-interprocess ipc-tokio ipc-legacy; do
    step "feature matrix: $backend alone as a library (no CLI): clippy on every target, warnings denied"
    # What a library user with default-features = false builds: code used
    # only by another backend's driver shows up here as dead code.
    cargo clippy --locked --no-default-features --features "$backend" --all-targets -- -D warnings
done
step "feature matrix: the DaemonEye facade (upstream-compat) over the legacy backend alone, no CLI"
cargo clippy --locked --no-default-features --features ipc-legacy,upstream-compat --all-targets -- -D warnings

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

step "the default build (what operators install) holds no benchmark crate"
default_tree=$(cargo tree --locked -e normal --prefix none)
if grep -E '^(plotters|indicatif|hdrhistogram|criterion) ' <<<"$default_tree"; then
    echo "the default features must not pull in the benchmark crates above (they belong to 'bench')" >&2
    exit 1
fi

step "a library user with default-features = false gets none of the CLI's crates"
library_tree=$(cargo tree --locked --no-default-features --features ipc-interprocess -e normal --prefix none)
if grep -E '^(clap|clap_complete|clap_mangen|serde_json|sysinfo|sha2|globset|tracing-subscriber|plotters|indicatif|hdrhistogram) ' <<<"$library_tree"; then
    echo "the library alone must not pull in the crates above (they belong to 'cli' or 'bench')" >&2
    exit 1
fi
# ...nor serde derives on the generated messages (feature serde-messages,
# which cli turns on): the build script's output for that build says.
out_dir=$(cargo check --locked --lib --no-default-features --features ipc-interprocess \
    --message-format json | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "build-script-executed" and "daemoneye-ipc" in message["package_id"]:
        print(message["out_dir"])')
if [[ ! -f "$out_dir/daemoneye.ipc.rs" ]]; then
    echo "cannot find the generated messages of the library-only build (out_dir: '$out_dir')" >&2
    exit 1
fi
if grep -q 'serde::Serialize' "$out_dir/daemoneye.ipc.rs"; then
    echo "the messages generated without 'cli' must not derive serde::Serialize ($out_dir)" >&2
    exit 1
fi

step "dependency policy: cargo deny check licenses bans sources"
if ! command -v cargo-deny >/dev/null 2>&1; then
    step "cargo install cargo-deny --locked"
    cargo install cargo-deny --locked
fi
cargo deny --locked check licenses bans sources
echo "NOTE: advisories are not checked here: 'cargo deny check advisories' needs the RustSec" \
    "database, which this machine cannot fetch; run it where it can (see README, Dependency policy)."

step "the declared minimum Rust ($msrv) builds every target and feature"
if ! grep -q "^$msrv-" <<<"$(rustup toolchain list)"; then
    rustup toolchain install "$msrv" --profile minimal
fi
cargo "+$msrv" check --locked --all-targets --all-features

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
