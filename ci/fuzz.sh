#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz with libFuzzer) for SECONDS
# each, from a seed corpus made of the golden frames; fails on any crash or
# broken invariant.
#
#   ci/fuzz.sh [SECONDS [TARGET...]]     default 60 s, every target
#
# Inputs that once broke a target are kept under fuzz/regressions/TARGET/
# and run first, every time.
# Needs a nightly toolchain and cargo-fuzz; installs both if missing
# (rustup toolchain install nightly --profile minimal; cargo install
# cargo-fuzz --locked). The corpus grows under target/fuzz-corpus/ and is
# kept between runs; a crash leaves its input under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
targets=(frame_stream typed_messages config_loader server_policy client_policy)
if [ $# -gt 1 ]; then
    targets=("${@:2}")
fi

step() { printf '\n==> [%s] %s\n' "$(date +%T)" "$*"; }

if ! rustup toolchain list | grep -q '^nightly'; then
    step "rustup toolchain install nightly --profile minimal"
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    step "cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

corpus=target/fuzz-corpus
python3 ci/fuzz-seeds.py "$corpus"

for target in "${targets[@]}"; do
    step "fuzz $target for ${seconds}s"
    regressions=()
    if [ -d "fuzz/regressions/$target" ]; then
        regressions=("fuzz/regressions/$target")
    fi
    cargo +nightly fuzz run "$target" "$corpus/$target" ${regressions[@]+"${regressions[@]}"} -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1
    echo "$target: $(find "$corpus/$target" -type f | wc -l) inputs in the corpus"
done

step "every fuzz target ran ${seconds}s without a crash"
