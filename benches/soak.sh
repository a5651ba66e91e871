#!/usr/bin/env bash
# Soak: steady KBS sessions through the proxy in front of two simulated replicas, one replica
# killed (SIGKILL) and restarted on the same port midway, for minutes; the scenario of
# tests/soak.rs, longer. Prints sessions, failures by type, affinity crossings, the proxy's
# RSS and open fds before and after, and its view of the replicas.
#
#   bash benches/soak.sh                         # 3 minutes of load, 8 clients, release build
#   DURATION=120 CONCURRENCY=16 bash benches/soak.sh
#   SKIP_BUILD=1 PROFILE=debug CARGO_TARGET_DIR=... bash benches/soak.sh
#
# The load comes from `kbs-affinity-proxy loadgen`. Where the binary has no `loadgen`, the
# script runs tests/soak.rs with KBS_SOAK_SECS=$DURATION instead.
#
# How to read it: with the kill, some sessions fail, each with a KBS error (`<step>: <type>
# (<status>)`); loadgen's next session on that client starts afresh and succeeds, which is
# the retry. Errors of kind `http`, `timeout` or `non-KBS error body` would be real failures,
# and so would any affinity violation (a session whose steps were answered by two replicas).
# RSS and fds are taken after a warm-up (the baseline) and after the load, each once the fd
# count has held still; a leak grows with the sessions, allocator slack and pooled
# connections do not.
#
# Everything runs on 127.0.0.1 with ports chosen by the kernel; every wait is bounded; all it
# starts is stopped on exit.
set -euo pipefail

DURATION=${DURATION:-180}
CONCURRENCY=${CONCURRENCY:-8}
WARMUP=${WARMUP:-5}
PROFILE=${PROFILE:-release}
SECRET=soak-secret-0123456789abcdef0123

BENCH_NAME=soak
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building ($PROFILE)"
    if [[ $PROFILE == release ]]; then
        cargo build --release --quiet --bin kbs-affinity-proxy
    else
        cargo build --quiet --bin kbs-affinity-proxy
    fi
fi
case $PROFILE in
    release) BIN=$CARGO_TARGET_DIR/release/kbs-affinity-proxy ;;
    *) BIN=$CARGO_TARGET_DIR/debug/kbs-affinity-proxy ;;
esac

if ! "$BIN" loadgen --help >/dev/null 2>&1; then
    log "no loadgen subcommand: running tests/soak.rs for ${DURATION}s instead"
    KBS_SOAK_SECS=$DURATION cargo test --test soak -- --nocapture
    exit
fi

# Waits (at most 30 s) for a line matching $2 in file $1, and prints it.
wait_line() {
    local i
    for ((i = 0; i < 300; i++)); do
        if grep -m1 -- "$2" "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "no \"$2\" in $1 within 30 s:"
    cat "$1" >&2
    exit 1
}

# Starts replica $1 on $2 (IP:PORT, port 0 for any); sets SIM_ADDR and SIM_PID.
start_sim() {
    local name=$1 listen=$2 logf=$WORK/$1.log
    : >"$logf"
    NO_COLOR=1 "$BIN" sim --listen "$listen" --name "$name" >/dev/null 2>"$logf" &
    SIM_PID=$!
    CHILDREN+=("$SIM_PID")
    SIM_ADDR=$(wait_line "$logf" "simulated KBS replica serving" | grep -o 'addr=[0-9.:]*' | cut -d= -f2)
}

# "RSS_KiB fds" of the proxy once its fd count has held still for 3 samples (at most 10 s).
settled() {
    local last now still=0 i
    last=$(ls "/proc/$PROXY/fd" | wc -l)
    for ((i = 0; i < 40 && still < 3; i++)); do
        sleep 0.25
        now=$(ls "/proc/$PROXY/fd" | wc -l)
        if [[ $now == "$last" ]]; then still=$((still + 1)); else still=0; fi
        last=$now
    done
    echo "$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY/status") $last"
}

start_sim kbs-0 127.0.0.1:0
R0=$SIM_ADDR
start_sim kbs-1 127.0.0.1:0
R1=$SIM_ADDR
R1_PID=$SIM_PID
"$BIN" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --backend "kbs-0=http://$R0" --backend "kbs-1=http://$R1" \
    --health-check http --health-check-interval 200ms --health-check-timeout 500ms \
    --health-fall 2 --health-rise 2 --backend-connect-timeout 1s --backend-response-timeout 5s \
    --session-table-size 512 --workers 1 --access-log off --log-format json \
    >/dev/null 2>"$WORK/proxy.log" &
PROXY=$!
CHILDREN+=($PROXY)
READY=$(wait_line "$WORK/proxy.log" '"message":"kbs-affinity-proxy serving"')
URL=http://$(sed -E 's/.*"listen":"([^"]+)".*/\1/' <<<"$READY")
ADMIN=http://$(sed -E 's/.*"admin":"([^"]+)".*/\1/' <<<"$READY")
log "replicas kbs-0 $R0, kbs-1 $R1; proxy $URL (pid $PROXY), admin $ADMIN"

log "warm-up ${WARMUP}s"
"$BIN" loadgen --url "$URL" --concurrency "$CONCURRENCY" --duration "${WARMUP}s" >/dev/null 2>&1
read -r RSS0 FD0 < <(settled)

log "load ${DURATION}s, $CONCURRENCY clients; kbs-1 killed at $((DURATION / 3))s, restarted $((DURATION / 6))s later"
"$BIN" loadgen --url "$URL" --concurrency "$CONCURRENCY" --duration "${DURATION}s" --json \
    >"$WORK/report.json" 2>"$WORK/progress.log" &
LOAD=$!
CHILDREN+=($LOAD)
sleep $((DURATION / 3))
kill -KILL "$R1_PID"
wait "$R1_PID" 2>/dev/null || true # reaps it, without the shell's "Killed" notice
log "kbs-1 killed"
sleep $((DURATION / 6))
start_sim kbs-1 "$R1"
log "kbs-1 restarted on $R1"
if ! timeout $((DURATION + 120)) tail --pid="$LOAD" -f /dev/null; then
    log "the load generator did not finish in time"
    exit 1
fi
wait "$LOAD"
read -r RSS1 FD1 < <(settled)

echo
echo "== soak: ${DURATION}s, $CONCURRENCY clients, kbs-1 killed and restarted midway ($PROFILE build)"
if command -v jq >/dev/null; then
    jq -r '
        "sessions:   \(.sessions_ok) ok, \(.sessions_failed) failed, \(.sessions_per_s | floor)/s; requests \(.requests)",
        "crossings:  \(.affinity_violations) sessions answered by more than one replica (\(.sessions_unattributed) unattributed)",
        "per replica: \(.sessions_by_replica | to_entries | map("\(.key) \(.value)") | join(", "))",
        "failures by type:\(if (.errors | length) == 0 then " none" else "" end)",
        (.errors | to_entries[] | "  \(.value)  \(.key)"),
        "latency ms (p50 / p99 / max): " + (.steps | map("\(.step) \(.latency.p50_us / 1000) / \(.latency.p99_us / 1000) / \(.latency.max_us / 1000)") | join("; "))
    ' "$WORK/report.json"
    NON_KBS=$(jq '[.errors | to_entries[] | select(.key | test("\\([0-9]{3}\\)$") | not) | .value] | add // 0' "$WORK/report.json")
    echo "non-KBS failures (http, timeout, non-KBS body): $NON_KBS"
else
    cat "$WORK/report.json"
fi
echo "proxy RSS:  ${RSS0} KiB -> ${RSS1} KiB ($(((RSS1 - RSS0))) KiB)"
echo "proxy fds:  ${FD0} -> ${FD1}"
echo "proxy view of kbs-1: $(curl -s --max-time 5 "$ADMIN/backends" | jq -c '.[] | select(.name == "kbs-1") | {healthy, pinned_refused, sessions_pinned, requests}' 2>/dev/null || echo '?')"
echo "health transitions: $(curl -s --max-time 5 "$ADMIN/metrics" | grep '^kbs_proxy_backend_health_transitions_total' | tr '\n' ' ')"
