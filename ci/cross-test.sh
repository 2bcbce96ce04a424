#!/usr/bin/env bash
# The test suite on other targets, and compile checks where nothing can run.
#
#   ci/cross-test.sh                  every target below
#   ci/cross-test.sh TARGET...        only these
#
# Runnable targets, tested with all features:
#   x86_64-pc-windows-gnu             mingw-w64 linker, run under Wine
#   aarch64-unknown-linux-gnu         cross gcc, run under qemu-aarch64
#   armv7-unknown-linux-gnueabihf     cross gcc, run under qemu-arm
# Compile-checked (cargo check and clippy, all targets, all features):
#   x86_64-apple-darwin  aarch64-apple-darwin  x86_64-unknown-freebsd
#
# With a Docker engine and `cross` on the PATH, runnable targets go through
# `cross test` (see Cross.toml). Otherwise the Debian packages and rustup
# targets they need are installed if missing, and cargo uses the linkers and
# runners of .cargo/config.toml. Exits non-zero if any target fails or could
# not be set up.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNNABLE=(x86_64-pc-windows-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
CHECK_ONLY=(x86_64-apple-darwin aarch64-apple-darwin x86_64-unknown-freebsd)

step() { printf '\n==> [%s] %s\n' "$(date +%T)" "$*"; }
is_one_of() { local x=$1; shift; for y in "$@"; do [[ $x == "$y" ]] && return 0; done; return 1; }

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=("${RUNNABLE[@]}" "${CHECK_ONLY[@]}")
fi
for target in "${targets[@]}"; do
    is_one_of "$target" "${RUNNABLE[@]}" "${CHECK_ONLY[@]}" || {
        echo "unknown target $target; known: ${RUNNABLE[*]} ${CHECK_ONLY[*]}" >&2
        exit 2
    }
done

use_cross=false
if command -v cross >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    use_cross=true
fi

packages_for() {
    case $1 in
        # wine64-preloader reserves the addresses Wine needs at fixed places
        # (the shared user data page at 0x7ffe0000 among them) before the C
        # library loads. Without it, about one start in 7,500 finds its heap
        # there and exits 1 at once, silently under WINEDEBUG=-all ("failed
        # to map the shared user data"): with some 5,000 Wine processes a
        # run, one run in two failed a random test that never ran.
        x86_64-pc-windows-gnu) echo gcc-mingw-w64-x86-64 wine64 wine64-preloader ;;
        aarch64-unknown-linux-gnu) echo gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user ;;
        armv7-unknown-linux-gnueabihf) echo gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user ;;
    esac
}

# The command prefix that runs one of the target's executables here; the
# tests use it to start the daemoneye-ipc binary as a server process.
runner_for() {
    case $1 in
        aarch64-unknown-linux-gnu) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
        armv7-unknown-linux-gnueabihf) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
        *) echo "" ;;  # Wine starts Windows children by itself.
    esac
}

install_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    step "installing ${missing[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_rust_targets() {
    local installed missing=()
    installed=$(rustup target list --installed)
    for target in "$@"; do
        grep -qx "$target" <<<"$installed" || missing+=("$target")
    done
    [[ ${#missing[@]} -eq 0 ]] || { step "rustup target add ${missing[*]}"; rustup target add "${missing[@]}"; }
}

# A Wine prefix under target/ with the bcryptprimitives.dll shim, and a
# persistent wineserver (without one, nextest sees each test's exiting
# wineserver as a leaked process).
prepare_wine() {
    export WINEPREFIX="$PWD/target/wine-prefix" WINEDEBUG=-all
    local wine=/usr/lib/wine/wine64 shim="$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
    if [[ ! -f $shim ]]; then
        step "preparing the Wine prefix $WINEPREFIX"
        mkdir -p "$WINEPREFIX"
        "$wine" wineboot --init >/dev/null 2>&1
        /usr/lib/wine/wineserver -w
        x86_64-w64-mingw32-gcc -shared -O2 -o target/bcryptprimitives.dll ci/bcryptprimitives.c -lbcrypt
        cp target/bcryptprimitives.dll "$shim"
    fi
    # A server left from an earlier use of the prefix is not persistent and
    # would go when its last client does; ours must be the one that runs.
    /usr/lib/wine/wineserver -k 2>/dev/null || true
    /usr/lib/wine/wineserver -w
    /usr/lib/wine/wineserver -p 2>>target/wineserver.log || {
        echo "could not start a persistent wineserver (see target/wineserver.log)" >&2
        return 1
    }
    # Start Wine's own services now, detached from our output: started by
    # the first test executable instead, they would inherit its stdout and
    # nextest would wait forever for that pipe to close.
    "$wine" wineboot >/dev/null 2>&1 </dev/null
    # A program run to its end shows Wine starts programs here, and that
    # the session is up before the first test (programs wait for wineboot).
    local answer
    answer=$("$wine" cmd.exe /c echo wine-ready 2>&1 </dev/null | tr -d '\r') || true
    if [[ $answer != wine-ready ]]; then
        echo "Wine cannot start a program in $WINEPREFIX (cmd.exe said: '$answer')" >&2
        return 1
    fi
}

failures=()
record() { # record TARGET WHAT COMMAND...
    local target=$1 what=$2
    shift 2
    if ! "$@"; then
        failures+=("$target: $what")
    fi
}

runnable=() checks=()
for target in "${targets[@]}"; do
    if is_one_of "$target" "${RUNNABLE[@]}"; then runnable+=("$target"); else checks+=("$target"); fi
done

if ! $use_cross && [[ ${#runnable[@]} -gt 0 ]]; then
    packages=()
    for target in "${runnable[@]}"; do read -ra more <<<"$(packages_for "$target")"; packages+=("${more[@]}"); done
    install_packages "${packages[@]}" || { echo "could not install ${packages[*]}" >&2; exit 1; }
fi
install_rust_targets "${targets[@]}" || { echo "could not add the rustup targets" >&2; exit 1; }

for target in "${runnable[@]}"; do
    step "$target: tests"
    if $use_cross; then
        record "$target" "cross test" cross test --locked --target "$target" --all-features
        continue
    fi
    if [[ $target == *windows* ]]; then
        prepare_wine || { failures+=("$target: Wine could not be prepared"); continue; }
        # ci/wine-run (the runner) notes here each program Wine failed to
        # start, so that those are told apart from failing tests.
        export DAEMONEYE_WINE_STARTUP_LOG="$PWD/target/wine-startup-failures.log"
        : >"$DAEMONEYE_WINE_STARTUP_LOG"
    fi
    export DAEMONEYE_TEST_RUNNER
    DAEMONEYE_TEST_RUNNER=$(runner_for "$target")
    # The soak tests measure a server's memory over a minute each; under
    # user-mode emulation that is the emulator's memory, and three minutes
    # more per target. They run natively (ci/test.sh), on every backend.
    record "$target" "nextest" cargo nextest run --locked --target "$target" --all-features --profile ci \
        -E 'not binary(soak)'

    step "$target: doctests"
    record "$target" "doctests" cargo test --locked --doc --target "$target" --all-features
    if [[ $target == *windows* ]]; then
        # Stop the persistent wineserver (and Wine's services) we started.
        /usr/lib/wine/wineserver -k 2>/dev/null || true
        if [[ -s $DAEMONEYE_WINE_STARTUP_LOG ]]; then
            failures+=("$target: Wine failed to start $(wc -l <"$DAEMONEYE_WINE_STARTUP_LOG") program(s): Wine start-up failures, not test failures (see the lines WINE START-UP FAILURE above, and $DAEMONEYE_WINE_STARTUP_LOG)")
        fi
        unset DAEMONEYE_WINE_STARTUP_LOG
    fi
done

for target in "${checks[@]}"; do
    step "$target: cargo check and clippy"
    record "$target" "check" cargo check --locked --target "$target" --all-targets --all-features
    record "$target" "clippy" cargo clippy --locked --target "$target" --all-targets --all-features -- -D warnings
done

if [[ ${#failures[@]} -gt 0 ]]; then
    printf '\ncross-target failures:\n' >&2
    printf '  %s\n' "${failures[@]}" >&2
    exit 1
fi
step "all cross-target checks passed: ${targets[*]}"
