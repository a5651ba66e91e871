#!/usr/bin/env bash
# Compares kbs-affinity-proxy with HAProxy and nginx doing the same job (sticky-cookie
# affinity over two HTTP/1.1 backends), with no proxy at all (the ceiling), and with relays that
# do no HTTP work (the floor under any proxy's CPU time).
#
#   bash benches/compare.sh                 # ~20 minutes on 2 cores; results on stdout
#   REPS=3 DURATION=10 CONNS=64 IDLE_CONNS=10000 bash benches/compare.sh
#   THREADS=1 MODES="ka-cookie close" bash benches/compare.sh   # a subset
#   PROXY_CPUS=0,1 LOAD_CPUS=2,3 bash benches/compare.sh          # on a 4-core machine
#   SKIP_BUILD=1 CARGO_TARGET_DIR=... bash benches/compare.sh   # reuse binaries built there
#   FLOOR=relay bash benches/compare.sh     # only the tokio relay as the floor (FLOOR= none)
#   H2_BACKENDS=1 bash benches/compare.sh   # also HAProxy and ours speaking HTTP/2 to the backends
#   OURS_B=/tmp/old/kbs-affinity-proxy bash benches/compare.sh   # another build beside this one
#   LOGS=1 bash benches/compare.sh          # also ours and HAProxy with their access logs on
#   TLS=1 bash benches/compare.sh           # also ours, HAProxy and nginx terminating TLS
#   KBS_SHAPED=0 bash benches/compare.sh    # backends answering a bare "ok" (before 2026-12)
#   CHART=ratios.svg bash benches/compare.sh  # also a chart of the ratios (bench-chart)
#   LOGS=1 TLS=1 ONLY="ours ours-log ours-tls ours-tls-log" REPS=15 bash benches/compare.sh
#                                           # only those targets: more pairs in the same time
#
# What it does, in one run:
#  1. installs haproxy, nginx and wrk with apt-get when missing (apt-get update first);
#  2. builds the proxy and three examples in release (examples/fast_backend.rs: two tiny
#     backends answering as the real KBS answers `GET /kbs/v0/resource/...` (fields and body
#     size of its JWE; `--kbs`, see the example's docs), or with KBS_SHAPED=0 a bare 200 "ok";
#     every request of the benchmark is that GET; examples/idle_conns.rs: the idle-connection opener;
#     examples/relay_floor.rs: the floor relay on tokio) and benches/compare/relays (its own
#     crate: the same relay on a bare epoll loop and on io_uring);
#  3. starts the backends, HAProxy (benches/compare/haproxy.cfg), nginx
#     (benches/compare/nginx.conf) and the proxy (--workers 1, --access-log off when the flag
#     exists), and for THREADS="1 2" also a second instance of each with two threads (HAProxy
#     nbthread 2, nginx two worker processes, ours --workers 2: targets named *-2t); every
#     proxy pinned to PROXY_CPUS (taskset; default core 0), wrk and the backends to LOAD_CPUS
#     (default core 1). On 2 cores the two-thread variants share the proxies' one core: they
#     show what each threading model costs, not scaling (give PROXY_CPUS two cores for that);
#     with them the FLOOR relays (default "relay relay-epoll relay-uring"), pinned like the
#     proxies, each passing every client connection's bytes to the first backend untouched:
#     their CPU per request is what the kernel's TCP work, the system calls and the event loop
#     cost by themselves, the part of a proxy's figure that its HTTP work does not explain
#     (relay-uring is left out, with a line saying why, where the kernel refuses io_uring;
#     the relays sit out the close mode, where they would open a backend connection per
#     request); with H2_BACKENDS=1 also haproxy-h2 (`proto h2` on its servers) and ours-h2
#     (`--backend-protocol http2`), one thread each, speaking HTTP/2 with prior knowledge to
#     the same backends (fast_backend serves both protocols); with OURS_B=PATH also ours-b,
#     that binary (another build of the proxy, e.g. before a change) run like ours with one
#     thread, right after it in every repetition, so two builds compare side by side; with
#     LOGS=1 also ours-log (`--access-log on`, stderr to a pipe that `cat` on the load core
#     drains into a file, as a container runtime reads a container's stderr) right after ours and
#     haproxy-log (`option httplog`, logging to a local Unix datagram socket drained by a
#     sink on the load core) right after haproxy, one thread each (ours-log's ratios are to
#     haproxy-log, and a table gives each one's cost against itself with logging off); with
#     TLS=1 also haproxy-tls, ours-tls and nginx-tls, one thread each, terminating TLS with the
#     same ECDSA P-256 certificate (made with openssl for the run; TLS 1.3, the cipher suite and
#     key exchange the client and each server agree on are printed), and with LOGS=1 also
#     haproxy-tls-log and ours-tls-log: their modes run over HTTPS, so `close` is a full
#     handshake per request (wrk resumes no sessions), and their ratios are to haproxy-tls
#     (haproxy-tls-log);
#  4. for REPS repetitions, interleaved (every target once per mode per repetition, every
#     other repetition in reverse order; with ONLY="t1 t2 ...", only the targets named there,
#     in the memory step too), runs `wrk -t1 -c$CONNS -d${DURATION}s --latency`
#     in the MODES (default all four):
#       ka-cookie    keep-alive, with a valid route cookie got first through that proxy
#       ka-nocookie  keep-alive, no cookie: the proxy balances and answers Set-Cookie
#       close        a new connection per request (Connection: close), with the cookie
#       ka-paced     ka-cookie, but each connection waits PACE_MS (2) ms between requests
#                    (benches/compare/paced.lua): the same offered load for every proxy,
#                    below saturation, so the latency columns compare proxies, not queues
#     and reads the proxy's CPU time (utime+stime of the process and its children,
#     /proc/PID/stat) before and after each run, and how busy PROXY_CPUS and LOAD_CPUS were
#     (/proc/stat: all but idle and iowait);
#  5. prints a Markdown table: medians over the repetitions of req/s, p50 and p99 latency,
#     CPU microseconds per request of the proxy process, ratios to HAProxy with as many
#     threads, and the busy shares of the two sides' cores (the side near 100 % is the one that
#     set the req/s);
#  6. restarts each proxy fresh and measures its RSS with IDLE_CONNS idle keep-alive client
#     connections (each has made one request), and per connection (HAProxy: at most 9000,
#     see benches/compare/haproxy.cfg), ours-b too when OURS_B is set, and with TLS=1 the
#     same over TLS (ours-tls, haproxy-tls, nginx-tls).
# Every run is bounded (wrk -d, timeouts on every wait); everything it starts is stopped on
# exit. Ports used: 18080/18083 (proxy), 18081-18082 (backends), 18090/18092 (HAProxy),
# 18091/18093 (nginx), the second of each pair for the two-thread variant; 18084-18086 (relay,
# relay-uring, relay-epoll); 18087 (ours-h2), 18094 (haproxy-h2), 18088 (ours-b), 18089
# (ours-log), 18095 (haproxy-log), 18096-18100 (ours-tls, haproxy-tls, nginx-tls, ours-tls-log,
# haproxy-tls-log).
set -euo pipefail

REPS=${REPS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
THREADS=${THREADS:-1 2}
MODES=(${MODES:-ka-cookie ka-nocookie close ka-paced})
FLOOR=${FLOOR-relay relay-epoll relay-uring}
H2_BACKENDS=${H2_BACKENDS:-0}
OURS_B=${OURS_B:-}
LOGS=${LOGS:-0}
TLS=${TLS:-0}
ONLY=${ONLY:-}
KBS_SHAPED=${KBS_SHAPED:-1}
REQUEST_PATH=/
BACKEND_FLAGS=()
if [[ $KBS_SHAPED == 1 ]]; then
    REQUEST_PATH=/kbs/v0/resource/default/key/1
    BACKEND_FLAGS=(--kbs)
fi
export PACE_MS=${PACE_MS:-2}
PROXY_CPU=${PROXY_CPUS:-0}
LOAD_CPU=${LOAD_CPUS:-1}
SECRET=bench-secret-0123456789abcdef0123

BENCH_NAME=compare
# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
HERE=$PWD

# Whether target $1 is measured: every one, or those ONLY names.
wanted() { [[ -z $ONLY || " $ONLY " == *" $1 "* ]]; }

# --- tools ---------------------------------------------------------------------------------
missing=()
for tool in haproxy nginx wrk; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in curl taskset ss openssl; do
    command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < IDLE_CONNS + 1000)); then
    log "open-file limit $(ulimit -n) is below IDLE_CONNS=$IDLE_CONNS + 1000"
    exit 1
fi

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building (release)"
    cargo build --release --quiet --bin kbs-affinity-proxy --example fast_backend --example idle_conns \
        --example relay_floor
    if [[ " $FLOOR " == *" relay-uring "* || " $FLOOR " == *" relay-epoll "* ]]; then
        cargo build --release --quiet --manifest-path benches/compare/relays/Cargo.toml
    fi
fi
PROXY_BIN=$CARGO_TARGET_DIR/release/kbs-affinity-proxy
if [[ -n $OURS_B && ! -x $OURS_B ]]; then
    log "OURS_B: $OURS_B is not an executable"
    exit 1
fi
BACKEND_BIN=$CARGO_TARGET_DIR/release/examples/fast_backend
IDLE_BIN=$CARGO_TARGET_DIR/release/examples/idle_conns
RELAY_BIN=$CARGO_TARGET_DIR/release/examples/relay_floor
RELAY_URING_BIN=$CARGO_TARGET_DIR/release/relay-uring
RELAY_EPOLL_BIN=$CARGO_TARGET_DIR/release/relay-epoll

for port in $(seq 18080 18100); do
    if ss -Htln "sport = :$port" | grep -q .; then
        log "port $port is taken"
        exit 1
    fi
done

# --- processes -----------------------------------------------------------------------------
# Waits (at most 10 s) until something accepts on 127.0.0.1:$1.
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "nothing listens on port $1"
    exit 1
}

# Each start_* sets $started to the pid of the process doing the work.
start_backends() {
    taskset -c "$LOAD_CPU" "$BACKEND_BIN" "${BACKEND_FLAGS[@]}" 127.0.0.1:18081 127.0.0.1:18082 \
        2>"$WORK/backends.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port 18081
    wait_port 18082
}

# start_* THREADS: the one-thread configuration, or its two-thread variant on the next port.
start_haproxy() {
    local cfg=benches/compare/haproxy.cfg port=18090
    if [[ ${1:-1} == 2 ]]; then
        cfg=$WORK/haproxy-2t.cfg port=18092
        sed 's/nbthread 1/nbthread 2/; s/127.0.0.1:18090/127.0.0.1:18092/' \
            benches/compare/haproxy.cfg >"$cfg"
    fi
    taskset -c "$PROXY_CPU" haproxy -db -f "$cfg" 2>"$WORK/haproxy-$1.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port "$port"
}

start_nginx() {
    local cfg=$HERE/benches/compare/nginx.conf port=18091
    mkdir -p "$WORK/nginx-$1"
    if [[ ${1:-1} == 2 ]]; then
        # Two workers need the master process; the CPU count then sums master and workers.
        cfg=$WORK/nginx-2t.conf port=18093
        sed 's/^worker_processes 1;/worker_processes 2;/; s/^master_process off;/master_process on;/;
             s/127.0.0.1:18091/127.0.0.1:18093/' "$HERE/benches/compare/nginx.conf" >"$cfg"
    fi
    taskset -c "$PROXY_CPU" nginx -p "$WORK/nginx-$1" -e stderr -c "$cfg" 2>"$WORK/nginx-$1.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port "$port"
}

OURS_FLAGS=(--backend b1=http://127.0.0.1:18081 --backend b2=http://127.0.0.1:18082)
ACCESS_LOG_FLAG=()
if "$PROXY_BIN" --help | grep -q -- '--access-log'; then
    ACCESS_LOG_FLAG=(--access-log off)
fi
# Starts an instance of the proxy, logging to $WORK/$1.log: binary $2 on port $3 with $4
# workers, and any further flags (with its access log off unless they say otherwise).
start_proxy_instance() {
    local name=$1 bin=$2 port=$3 workers=$4
    shift 4
    local log_flag=("${ACCESS_LOG_FLAG[@]}") err=$WORK/$name.log
    [[ " $* " == *" --access-log "* ]] && log_flag=()
    if [[ " $* " == *" --access-log on "* ]]; then
        # Its access log goes where a container runtime takes it: a pipe, read on the load
        # core (as HAProxy's sink reads its log socket there) into the file.
        err=$WORK/$name.fifo
        mkfifo "$err"
        taskset -c "$LOAD_CPU" cat "$err" >"$WORK/$name.log" &
        CHILDREN+=("$!")
    fi
    KBS_AFFINITY_PROXY_COOKIE_SECRET=$SECRET RUST_LOG=warn \
        taskset -c "$PROXY_CPU" "$bin" "${OURS_FLAGS[@]}" "${log_flag[@]}" --listen "127.0.0.1:$port" \
        --workers "$workers" "$@" 2>"$err" &
    started=$!
    CHILDREN+=("$started")
    wait_port "$port"
}

start_ours() {
    if [[ ${1:-1} == 2 ]]; then
        start_proxy_instance ours-2 "$PROXY_BIN" 18083 2
    else
        start_proxy_instance ours-1 "$PROXY_BIN" 18080 1
    fi
}

# The HTTP/2-to-backends variants (H2_BACKENDS=1): one thread each, on their own ports.
start_haproxy-h2() {
    sed 's/127.0.0.1:18090/127.0.0.1:18094/; s/^\( *server .*\)$/\1 proto h2/' \
        benches/compare/haproxy.cfg >"$WORK/haproxy-h2.cfg"
    taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy-h2.cfg" 2>"$WORK/haproxy-h2.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port 18094
}

start_ours-h2() {
    start_proxy_instance ours-h2 "$PROXY_BIN" 18087 1 --backend-protocol http2
}

# Another build of the proxy (OURS_B), one thread, on its own port.
start_ours-b() {
    start_proxy_instance ours-b "$OURS_B" 18088 1
}

# The access-log variants (LOGS=1), one thread each. Ours writes its lines to stderr, a file
# here; HAProxy sends each to a Unix datagram socket that a sink on the load core drains.
start_ours-log() {
    start_proxy_instance ours-log "$PROXY_BIN" 18089 1 --access-log on
}

start_haproxy-log() {
    local sock=$WORK/haproxy-log.sock
    taskset -c "$LOAD_CPU" python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
while True:
    s.recv(65536)
' "$sock" &
    CHILDREN+=("$!")
    for ((i = 0; i < 100; i++)); do
        [[ -S $sock ]] && break
        sleep 0.05
    done
    sed "s|127.0.0.1:18090|127.0.0.1:18095|; s|^global$|global\n    log $sock local0|;
         s|^defaults$|defaults\n    log global\n    option httplog|" \
        benches/compare/haproxy.cfg >"$WORK/haproxy-log.cfg"
    taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy-log.cfg" 2>"$WORK/haproxy-log.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port 18095
}

# The TLS variants (TLS=1): one thread each, the same certificate and key for all.
TLS_CERT=$WORK/tls.crt
TLS_KEY=$WORK/tls.key
make_certificate() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -keyout "$TLS_KEY" -out "$TLS_CERT" 2>"$WORK/openssl.log"
    cat "$TLS_CERT" "$TLS_KEY" >"$WORK/tls.pem"
}

start_ours-tls() {
    start_proxy_instance ours-tls "$PROXY_BIN" 18096 1 --tls-cert "$TLS_CERT" --tls-key "$TLS_KEY"
}

start_ours-tls-log() {
    start_proxy_instance ours-tls-log "$PROXY_BIN" 18099 1 --tls-cert "$TLS_CERT" --tls-key "$TLS_KEY" \
        --access-log on
}

# HAProxy with the configuration $1 on port $2, TLS on its bind line.
start_haproxy_tls_on() {
    sed "s|bind 127.0.0.1:[0-9]*|bind 127.0.0.1:$2 ssl crt $WORK/tls.pem|" "$1" >"$WORK/haproxy-tls-$2.cfg"
    taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy-tls-$2.cfg" 2>"$WORK/haproxy-tls-$2.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port "$2"
}

start_haproxy-tls() {
    start_haproxy_tls_on benches/compare/haproxy.cfg 18097
}

start_haproxy-tls-log() {
    start_haproxy-log
    stop "$started"
    start_haproxy_tls_on "$WORK/haproxy-log.cfg" 18100
}

start_nginx-tls() {
    mkdir -p "$WORK/nginx-tls"
    # nginx 1.22 leaves TLS 1.3 out of its default protocols; the others negotiate it.
    sed "s|listen 127.0.0.1:18091;|listen 127.0.0.1:18098 ssl;\n        ssl_protocols TLSv1.3;\n        ssl_certificate $TLS_CERT;\n        ssl_certificate_key $TLS_KEY;|" \
        "$HERE/benches/compare/nginx.conf" >"$WORK/nginx-tls.conf"
    taskset -c "$PROXY_CPU" nginx -p "$WORK/nginx-tls" -e stderr -c "$WORK/nginx-tls.conf" \
        2>"$WORK/nginx-tls.log" &
    started=$!
    CHILDREN+=("$started")
    wait_port 18098
}

# Starts the floor relay $1 (binary $2) on port $3, relaying to the first backend.
start_floor() {
    taskset -c "$PROXY_CPU" "$2" "127.0.0.1:$3" 127.0.0.1:18081 2>"$WORK/$1.log" &
    started=$!
    CHILDREN+=("$started")
}

start_relay() {
    start_floor relay "$RELAY_BIN" 18084
    wait_port 18084
}

start_relay-epoll() {
    start_floor relay-epoll "$RELAY_EPOLL_BIN" 18086
    wait_port 18086
}

# Sets $started to "" when the relay cannot start (a kernel without io_uring, or refusing it).
start_relay-uring() {
    start_floor relay-uring "$RELAY_URING_BIN" 18085
    local i
    for ((i = 0; i < 100; i++)); do
        (exec 3<>/dev/tcp/127.0.0.1/18085) 2>/dev/null && return 0
        if ! kill -0 "$started" 2>/dev/null; then
            log "relay-uring left out: $(tail -1 "$WORK/relay-uring.log")"
            started=
            return 0
        fi
        sleep 0.1
    done
    log "nothing listens on port 18085"
    exit 1
}

stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# utime and stime of a process and its child processes (nginx's workers), in clock ticks, as
# "UTIME STIME" (fields 14 and 15 of /proc/PID/stat, which count every thread; the comm field
# may hold spaces, so count from the closing parenthesis).
cpu_ticks() {
    local p user=0 sys=0 u s
    for p in "$1" $(pgrep -P "$1" || true); do
        read -r u s < <(sed 's/^.*) //' "/proc/$p/stat" | awk '{ print $12, $13 }')
        user=$((user + u))
        sys=$((sys + s))
    done
    echo "$user $sys"
}

rss_kb() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# Prints "busy total" jiffies, summed over the CPUs in list $1 ("0", "0,1", "2-3"), from
# /proc/stat: busy is all but idle and iowait. Over a run, busy/total says whether those cores
# were the bottleneck (near 100 %) or waited for the others.
core_ticks() {
    local cpus=() part
    for part in ${1//,/ }; do
        if [[ $part == *-* ]]; then
            cpus+=($(seq "${part%-*}" "${part#*-}"))
        else
            cpus+=("$part")
        fi
    done
    awk -v list=" ${cpus[*]} " '
        /^cpu[0-9]+ / {
            n = substr($1, 4)
            if (index(list, " " n " ")) {
                t = 0
                for (i = 2; i <= NF; i++) t += $i
                busy += t - $5 - $6; total += t
            }
        }
        END { print busy + 0, total + 0 }' /proc/stat
}

# The URL a benchmark request of target $1 goes to.
url_of() {
    local scheme=http
    [[ $1 == *-tls* ]] && scheme=https
    echo "$scheme://127.0.0.1:${PORT[$1]}$REQUEST_PATH"
}

# The `route=...` pair of the Set-Cookie answered to a cookie-less request to target $1.
route_cookie() {
    curl -k -s -m 5 -D - -o /dev/null "$(url_of "$1")" |
        tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(route=[^;]*\).*/\1/p' | head -1
}

# Which backend answers with cookie $2 through target $1, five times: one name expected.
backends_seen() {
    local i
    for ((i = 0; i < 5; i++)); do
        curl -k -s -m 5 -D - -o /dev/null -H "Cookie: $2" "$(url_of "$1")" |
            tr -d '\r' | sed -n 's/^[Xx]-[Bb]ackend: //p'
    done | sort -u | tr '\n' ' '
}

# --- throughput ----------------------------------------------------------------------------
start_backends
declare -A PID=([direct]=$started)
declare -A PORT=([direct]=18081 [haproxy]=18090 [nginx]=18091 [ours]=18080
    [haproxy-2t]=18092 [nginx-2t]=18093 [ours-2t]=18083 [relay]=18084 [relay-uring]=18085
    [relay-epoll]=18086 [ours-h2]=18087 [haproxy-h2]=18094 [ours-b]=18088 [ours-log]=18089
    [haproxy-log]=18095 [ours-tls]=18096 [haproxy-tls]=18097 [nginx-tls]=18098 [ours-tls-log]=18099
    [haproxy-tls-log]=18100)
declare -A COOKIE=([direct]="route=none")
TARGETS=(direct)
for t in $FLOOR; do
    if ! declare -F "start_$t" >/dev/null || [[ $t != relay* ]]; then
        log "FLOOR: no relay named $t (relay, relay-epoll, relay-uring)"
        exit 1
    fi
    "start_$t"
    if [[ -n $started ]]; then
        PID[$t]=$started
        COOKIE[$t]="route=none"
        TARGETS+=("$t")
    fi
done
FLOORS=$((${#TARGETS[@]} - 1))
for n in $THREADS; do
    # HAProxy and ours one after the other in every repetition: their ratios are paired.
    for p in haproxy ours nginx; do
        t=$p
        [[ $n == 2 ]] && t=$p-2t
        "start_$p" "$n"
        PID[$t]=$started
        TARGETS+=("$t")
        if [[ $t == ours && -n $OURS_B ]]; then
            start_ours-b
            PID[ours-b]=$started
            TARGETS+=(ours-b)
        fi
        if [[ ($t == ours || $t == haproxy) && $LOGS == 1 ]]; then
            "start_$t-log"
            PID[$t-log]=$started
            TARGETS+=("$t-log")
        fi
    done
done
if [[ $TLS == 1 ]]; then
    make_certificate
    tls_targets=(haproxy-tls ours-tls nginx-tls)
    [[ $LOGS == 1 ]] && tls_targets=(haproxy-tls haproxy-tls-log ours-tls ours-tls-log nginx-tls)
    for t in "${tls_targets[@]}"; do
        "start_$t"
        PID[$t]=$started
        TARGETS+=("$t")
        log "$t: $(openssl s_client -connect "127.0.0.1:${PORT[$t]}" -servername localhost </dev/null 2>/dev/null |
            sed -n 's/^New, \(.*\)$/\1/p; s/^Server Temp Key: \(.*\)$/key exchange \1/p' | tr '\n' ' ')"
    done
fi
if [[ $H2_BACKENDS == 1 ]]; then
    for t in haproxy-h2 ours-h2; do
        "start_$t"
        PID[$t]=$started
        TARGETS+=("$t")
    done
fi

for t in "${TARGETS[@]:$((1 + FLOORS))}"; do
    COOKIE[$t]=$(route_cookie "$t")
    if [[ -z ${COOKIE[$t]} ]]; then
        log "$t answered no route cookie"
        exit 1
    fi
    log "$t: cookie ${COOKIE[$t]:0:24}... routes to: $(backends_seen "$t" "${COOKIE[$t]}")"
done

# Runs wrk against target $1 in mode $2; appends one TSV line to $WORK/runs.tsv:
# rep mode target req/s p50_us p99_us cpu_us_per_req requests errors user_us sys_us
# proxy_cores_busy_% load_cores_busy_%
run_wrk() {
    local target=$1 mode=$2 rep=$3 hdr=()
    case $mode in
        ka-cookie) hdr=(-H "Cookie: ${COOKIE[$target]}") ;;
        ka-nocookie) hdr=() ;;
        close) hdr=(-H "Cookie: ${COOKIE[$target]}" -H "Connection: close") ;;
        ka-paced) hdr=(-H "Cookie: ${COOKIE[$target]}" -s "$HERE/benches/compare/paced.lua") ;;
        *)
            log "unknown mode $mode"
            exit 1
            ;;
    esac
    local pid=${PID[$target]} u0 s0 u1 s1 pb0 pt0 pb1 pt1 lb0 lt0 lb1 lt1
    read -r u0 s0 < <(cpu_ticks "$pid")
    read -r pb0 pt0 < <(core_ticks "$PROXY_CPU")
    read -r lb0 lt0 < <(core_ticks "$LOAD_CPU")
    timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s --latency "${hdr[@]}" \
        "$(url_of "$target")" >"$WORK/wrk.out"
    read -r u1 s1 < <(cpu_ticks "$pid")
    read -r pb1 pt1 < <(core_ticks "$PROXY_CPU")
    read -r lb1 lt1 < <(core_ticks "$LOAD_CPU")
    awk -v rep="$rep" -v mode="$mode" -v target="$target" -v user=$((u1 - u0)) -v sys=$((s1 - s0)) \
        -v pbusy=$((pb1 - pb0)) -v ptotal=$((pt1 - pt0)) -v lbusy=$((lb1 - lb0)) -v ltotal=$((lt1 - lt0)) \
        -v hz="$(getconf CLK_TCK)" '
        function us(v) {
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return v * 1000
            if (v ~ /s$/) return v * 1000000
            return v
        }
        / requests in / { requests = $1 }
        /^Requests\/sec:/ { rps = $2 }
        /^ +50%/ { p50 = us($2) }
        /^ +99%/ { p99 = us($2) }
        /Non-2xx or 3xx responses:/ { errors += $NF }
        /Socket errors:/ { gsub(",", ""); errors += $4 + $6 + $8 + $10 }
        END {
            per = requests > 0 ? 1e6 / hz / requests : 0
            printf "%s\t%s\t%s\t%.0f\t%.0f\t%.0f\t%.2f\t%d\t%d\t%.2f\t%.2f\t%.1f\t%.1f\n",
                rep, mode, target, rps, p50, p99, (user + sys) * per, requests, errors,
                user * per, sys * per, (ptotal > 0 ? 100 * pbusy / ptotal : 0),
                (ltotal > 0 ? 100 * lbusy / ltotal : 0)
        }' "$WORK/wrk.out" >>"$WORK/runs.tsv"
    tail -1 "$WORK/runs.tsv" | awk -F'\t' '{ printf "[compare] rep %s %-11s %-10s %8s req/s  p50 %6s us  p99 %6s us  cpu %6s us/req (user %s, sys %s)  busy %s%%/%s%%  errors %s\n", $1, $2, $3, $4, $5, $6, $7, $10, $11, $12, $13, $9 }' >&2
}

for t in $ONLY; do
    if [[ -z ${PID[$t]:-} ]]; then
        log "ONLY: $t is not started with these settings (targets: ${TARGETS[*]})"
        exit 1
    fi
done
log "warm-up"
for t in "${TARGETS[@]}"; do
    wanted "$t" || continue
    timeout 20 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s -H "Cookie: ${COOKIE[$t]}" \
        "$(url_of "$t")" >/dev/null
done

: >"$WORK/runs.tsv"
for ((rep = 1; rep <= REPS; rep++)); do
    # Every other repetition runs the targets in reverse order, so a pair that runs side by
    # side (ours and ours-log) runs in both orders: whatever a run leaves behind for the next
    # (TIME_WAIT sockets in the close mode, a warmer cache) weighs on both sides alike. In one
    # order only, ours-tls-log / ours-tls measured 1.09 in the close mode, where the log's own
    # work is under 1 % of a handshake.
    order=("${TARGETS[@]}")
    if ((rep % 2 == 0)); then
        for ((i = ${#TARGETS[@]} - 1, j = 0; i >= 0; i--, j++)); do order[j]=${TARGETS[i]}; done
    fi
    for mode in "${MODES[@]}"; do
        for t in "${order[@]}"; do
            # A relay opens a backend connection per client connection: in the close mode that
            # is one per request, which no pooling proxy does (and the TIME_WAIT sockets it
            # leaves would weigh on the targets after it).
            [[ $mode == close && " $FLOOR " == *" $t "* ]] && continue
            wanted "$t" || continue
            run_wrk "$t" "$mode" "$rep"
        done
    done
done
cp "$WORK/runs.tsv" "${RUNS_TSV:-/dev/null}" 2>/dev/null || true

# --- summary -------------------------------------------------------------------------------
echo
echo "wrk -t1 -c$CONNS -d${DURATION}s --latency; medians of $REPS interleaved runs (min-max of req/s);"
echo "CPU = utime+stime of the proxy process per request (for direct: of the backend process;"
echo "relay, relay-epoll, relay-uring: the floor relays, which do no HTTP work, on tokio, a bare"
echo "epoll loop and io_uring),"
echo "with its user and system parts. Ratios to HAProxy are paired: the median, over the"
echo "repetitions, of this target's figure divided by HAProxy's in the same repetition (the two"
echo "ran one after the other), so a change of the host's speed between repetitions cancels out;"
echo "in parentheses, the range of those per-repetition ratios without their lowest and highest"
echo "quarter (rounded down: with 3 repetitions, all of them): how far the host's speed moved within"
echo "the pairs."
if [[ -n $OURS_B ]]; then
    echo "ours-b: $OURS_B, run beside ours in every repetition (after it, before it in even ones)."
fi
echo
echo "ka-paced: each connection waits ${PACE_MS} ms between requests. Ratios: to HAProxy with as"
echo "many threads (*-2t: to haproxy-2t). CPU layout: proxies on CPU $PROXY_CPU, load on CPU $LOAD_CPU."
echo
echo "Busy = the share of the proxies' cores / of the load's cores not idle during the run (all"
echo "processes): a load side near 100 % with the proxy's core below it means the load side, not the"
echo "proxy, set that req/s."
echo
echo "| mode | target | req/s | p50 ms | p99 ms | CPU µs/req (user + sys) | req/s vs HAProxy | CPU vs HAProxy | busy % proxy / load | errors |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
SUMMARY_AWK='
    # Splits the numbers in s into a[1..n], sorted; returns n.
    function sorted(s, a,    n, i, j, t) {
        n = split(s, a, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) {
            t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
        }
        return n
    }
    function median(s,    a, n) {
        n = sorted(s, a)
        if (n == 0) return 0
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    # The range of the numbers in s without their lowest and highest quarter, rounded down:
    # "low-high" (with three, the smallest and the largest; with 25, the 7th and the 19th).
    function middle(s,    a, n, out) {
        n = sorted(s, a)
        if (n == 0) return "-"
        out = int((n - 1) / 4)
        return sprintf("%.2f-%.2f", a[1 + out], a[n - out])
    }
    function minmax(s,    a, n) {
        n = sorted(s, a)
        return a[1] "-" a[n]
    }
    # Per repetition, field f of key k divided by that of key h in the same one.
    function ratios(f, k, h,    r, s) {
        s = ""
        for (r = 1; r <= reps; r++)
            if ((f, k, r) in one && (f, h, r) in one && one[f, h, r] > 0)
                s = s " " one[f, k, r] / one[f, h, r]
        return s
    }
    function paired(f, k, h) {
        return median(ratios(f, k, h))
    }
    # The paired median and, in parentheses, the middle half of the ratios of the repetitions.
    function paired_spread(f, k, h,    r) {
        r = ratios(f, k, h)
        return sprintf("%.2f (%s)", median(r), middle(r))
    }
    {
        k = $2 SUBSEP $3
        rps[k] = rps[k] " " $4; p50[k] = p50[k] " " $5; p99[k] = p99[k] " " $6
        cpu[k] = cpu[k] " " $7; usr[k] = usr[k] " " $10; sys[k] = sys[k] " " $11; err[k] += $9
        pbusy[k] = pbusy[k] " " $12; lbusy[k] = lbusy[k] " " $13
        one["rps", k, $1] = $4; one["cpu", k, $1] = $7
        if ($1 > reps) reps = $1
    }'
awk -F'\t' -v modes="${MODES[*]}" -v targets="${TARGETS[*]}" "$SUMMARY_AWK"'
    END {
        nm = split(modes, mode, " ")
        nt = split(targets, target, " ")
        for (m = 1; m <= nm; m++) {
            for (t = 1; t <= nt; t++) {
                k = mode[m] SUBSEP target[t]
                if (!(k in rps)) continue
                h = mode[m] SUBSEP (target[t] ~ /-2t$/ ? "haproxy-2t" : \
                    target[t] == "ours-log" ? "haproxy-log" : \
                    target[t] == "ours-tls-log" ? "haproxy-tls-log" : \
                    target[t] ~ /-tls/ ? "haproxy-tls" : "haproxy")
                rr = (h in rps) ? paired_spread("rps", k, h) : "-"
                cr = (target[t] == "direct" || !(h in cpu)) ? "-" : paired_spread("cpu", k, h)
                printf "| %s | %s | %d (%s) | %.3f | %.3f | %.1f (%.1f + %.1f) | %s | %s | %.0f / %.0f | %d |\n", \
                    mode[m], target[t], median(rps[k]), minmax(rps[k]), median(p50[k]) / 1000, \
                    median(p99[k]) / 1000, median(cpu[k]), median(usr[k]), median(sys[k]), rr, cr, \
                    median(pbusy[k]), median(lbusy[k]), err[k]
            }
        }
    }' "$WORK/runs.tsv"

# The new-session path against the pinned path, per proxy, paired the same way.
if [[ " ${MODES[*]} " == *" ka-cookie "* && " ${MODES[*]} " == *" ka-nocookie "* ]]; then
    echo
    echo "New sessions (ka-nocookie: balance + Set-Cookie) against the pinned path (ka-cookie), per"
    echo "proxy: the median over repetitions of the ratio in the same repetition."
    echo
    echo "| target | CPU per request, no cookie / cookie | req/s, no cookie / cookie |"
    echo "|---|---:|---:|"
    awk -F'\t' -v targets="${TARGETS[*]:$((1 + FLOORS))}" "$SUMMARY_AWK"'
        END {
            nt = split(targets, target, " ")
            for (t = 1; t <= nt; t++) {
                k = "ka-nocookie" SUBSEP target[t]; h = "ka-cookie" SUBSEP target[t]
                if (!(k in cpu) || !(h in cpu)) continue
                printf "| %s | %.3f | %.3f |\n", target[t], paired("cpu", k, h), paired("rps", k, h)
            }
        }' "$WORK/runs.tsv"
fi

# The access log's cost: each proxy with its log on against itself with it off, paired.
if [[ $LOGS == 1 ]]; then
    echo
    echo "Access log on (ours-log: stderr to a pipe drained on the load core; haproxy-log: option httplog to a local Unix"
    echo "datagram socket) against the same proxy with it off, per mode: the median over"
    echo "repetitions of the ratio in the same repetition (middle half in parentheses)."
    echo
    echo "| mode | proxy | CPU per request, log on / off | req/s, log on / off |"
    echo "|---|---|---:|---:|"
    awk -F'\t' -v modes="${MODES[*]}" "$SUMMARY_AWK"'
        END {
            nm = split(modes, mode, " ")
            for (m = 1; m <= nm; m++) {
                np = split("ours haproxy ours-tls haproxy-tls", proxy, " ")
                for (p = 1; p <= np; p++) {
                    k = mode[m] SUBSEP proxy[p] "-log"; h = mode[m] SUBSEP proxy[p]
                    if (!(k in cpu) || !(h in cpu)) continue
                    printf "| %s | %s | %s | %s |\n", mode[m], proxy[p], \
                        paired_spread("cpu", k, h), paired_spread("rps", k, h)
                }
            }
        }' "$WORK/runs.tsv"
fi

# --- memory with idle connections ----------------------------------------------------------
for t in "${TARGETS[@]:1}"; do
    stop "${PID[$t]}"
done

echo
echo "RSS with $IDLE_CONNS idle keep-alive client connections (each made one request first),"
echo "each proxy freshly started and warmed with 1 s of wrk -c8; RSS = VmRSS of its process:"
echo
echo "| proxy | RSS before | RSS with the idle connections | per connection (connections) |"
echo "|---|---:|---:|---:|"
idle_targets=(ours ${OURS_B:+ours-b} haproxy nginx)
[[ $TLS == 1 ]] && idle_targets+=(ours-tls haproxy-tls nginx-tls)
for t in "${idle_targets[@]}"; do
    wanted "$t" || continue
    "start_$t" 1
    pid=$started
    timeout 20 taskset -c "$LOAD_CPU" wrk -t1 -c8 -d1s "$(url_of "$t")" >/dev/null
    sleep 1
    before=$(rss_kb "$pid")
    n=$IDLE_CONNS
    # HAProxy will not start with room for more than 9990 connections under a 20000 fd limit.
    [[ $t == haproxy* ]] && ((n > 9000)) && n=9000
    : >"$WORK/idle.out"
    idle_flags=()
    [[ $t == *-tls ]] && idle_flags=(--tls)
    taskset -c "$LOAD_CPU" "$IDLE_BIN" "${idle_flags[@]}" "127.0.0.1:${PORT[$t]}" "$n" 20 \
        >"$WORK/idle.out" 2>"$WORK/idle.err" &
    idle=$!
    CHILDREN+=("$idle")
    for ((i = 0; i < 600; i++)); do
        grep -q '^ready' "$WORK/idle.out" && break
        kill -0 "$idle" 2>/dev/null || break
        sleep 0.1
    done
    opened=$(sed -n 's/^ready //p' "$WORK/idle.out")
    sleep 1
    after=$(rss_kb "$pid")
    established=$(ss -Htn state established "( sport = :${PORT[$t]} )" | wc -l)
    stop "$idle"
    awk -v t="$t" -v b="$before" -v a="$after" -v n="${opened:-0}" -v e="$established" 'BEGIN {
        printf "| %s | %.1f MiB | %.1f MiB | %.2f KiB (%d opened, %d established) |\n",
            t, b / 1024, a / 1024, (n > 0 ? (a - b) / n : 0), n, e
    }'
    stop "$pid"
done

# A chart of the ratios, drawn from the runs (docs/benchmarks.md): CHART=FILE.svg, its path
# from the repository root or absolute.
[[ -z ${CHART:-} ]] || "$PROXY_BIN" bench-chart "$WORK/runs.tsv" --out "$CHART"
