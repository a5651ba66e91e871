#!/usr/bin/env bash
# Runs the fuzz targets, each for a bounded time.
#
#   fuzz/run.sh [SECONDS] [TARGET...]        SECONDS per target (default 60); all targets by default
#
# Environment:
#   SANITIZER=address|none   (default: address; falls back to none if the address build fails)
#   FUZZ_ARGS="..."          extra libFuzzer flags, e.g. "-jobs=2 -workers=2"
#   FAST_VS_HYPER_SKIP_KNOWN=1  fast_vs_hyper: do not send inputs that show a known divergence
#                            (fuzz/fuzz_targets/fast_vs_hyper/known.rs: one, kept on purpose);
#                            the default here; set it to 0 to have those reported too
#
# cargo-fuzz wants a nightly compiler for its -Z flags. On a stable toolchain this script sets
# RUSTC_BOOTSTRAP=1, which makes stable rustc/cargo accept them.
set -euo pipefail
export FAST_VS_HYPER_SKIP_KNOWN=${FAST_VS_HYPER_SKIP_KNOWN:-1}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."   # cargo fuzz looks for ./fuzz

secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(route_cookie set_cookie fast_vs_hyper)
fi

# Per-target libFuzzer flags: a dictionary where there is one.
target_args() {
    case "$1" in
        fast_vs_hyper) echo "-dict=fuzz/dict/http.dict" ;;
        *) ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

sanitizer="${SANITIZER:-address}"
if [ "$sanitizer" != none ] && ! cargo fuzz build -s "$sanitizer" "${targets[@]:0:1}"; then
    echo "run.sh: the $sanitizer sanitizer build failed; falling back to -s none" >&2
    sanitizer=none
fi

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    # The committed seeds; libFuzzer adds what it finds next to them (fuzz/corpus is not committed).
    cp -n "fuzz/seeds/$t/"* "fuzz/corpus/$t/" 2>/dev/null || true
    echo "== $t: ${secs}s, sanitizer $sanitizer"
    # shellcheck disable=SC2086,SC2046
    cargo fuzz run -s "$sanitizer" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 $(target_args "$t") ${FUZZ_ARGS:-}
done
