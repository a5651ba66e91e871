# Sourced by the benchmark scripts (benches/compare.sh, benches/soak.sh) after they set
# BENCH_NAME: moves to the repository root, sets CARGO_TARGET_DIR (default target/), makes a
# scratch directory $WORK, and on exit stops every pid in CHILDREN and removes $WORK.
# log prints "[$BENCH_NAME] ..." on stderr.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
WORK=$(mktemp -d "/tmp/kbs-$BENCH_NAME.XXXXXX")
CHILDREN=()

log() { echo "[$BENCH_NAME] $*" >&2; }

cleanup() {
    local p
    for p in "${CHILDREN[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
