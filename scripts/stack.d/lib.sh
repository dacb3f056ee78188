# shellcheck shell=bash disable=SC2034 # the tables are used by the files that source this one
# Helpers shared by scripts/stack: messages, the parts table, pidfiles, detached processes,
# ports, readiness polling and templates. Sourced, never run.

# ---------------------------------------------------------------------------------------
# Messages

log() { printf 'stack: %s\n' "$*" >&2; }
warn() { printf 'stack: warning: %s\n' "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------
# The parts of the stack, in start order. Each part NAME has functions named after it with
# dashes turned into underscores: prepare_NAME (install and write its config), start_NAME
# (spawn it), health_NAME (exit 0 when it serves requests) and, optionally, after_NAME
# (run once it is healthy).

INFRA_PARTS=(kafka clickhouse redis stripe-mock)
TOLLGATE_PARTS=(demo-upstream gateway meter-consumer billing-sync portal)
# Stop order: Tollgate first (the gateway flushes its usage events to Kafka on SIGTERM),
# then the servers, Kafka last.
STOP_ORDER=(portal gateway meter-consumer billing-sync demo-upstream stripe-mock redis clickhouse kafka)

# Parts started, and waited for, before the rest of INFRA_PARTS (which start all at once).
FIRST_PARTS=()

# Parts that are sent SIGTERM together when `down` begins: the nodes of one KRaft quorum, of
# which the last one left cannot finish a clean shutdown alone.
STOP_TOGETHER=()

# Ports and addresses, from stack.d/ports.sh.
declare -A PART_PORTS=(
    [kafka]="$KAFKA_PORT $KAFKA_CONTROLLER_PORT"
    [clickhouse]="$CLICKHOUSE_HTTP_PORT $CLICKHOUSE_TCP_PORT"
    [redis]="$REDIS_PORT"
    [stripe-mock]="$STRIPE_MOCK_PORT $STRIPE_MOCK_HTTPS_PORT"
    [demo-upstream]="$DEMO_UPSTREAM_PORT"
    [gateway]="$GATEWAY_PORT $GATEWAY_ADMIN_PORT"
    [meter-consumer]="$METER_CONSUMER_PORT"
    [billing-sync]="$BILLING_SYNC_PORT"
    [portal]="$PORTAL_PORT"
)
KAFKA_ADDRESS=127.0.0.1:$KAFKA_PORT
CLICKHOUSE_URL=http://127.0.0.1:$CLICKHOUSE_HTTP_PORT
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
STRIPE_MOCK_URL=http://127.0.0.1:$STRIPE_MOCK_PORT
DEMO_UPSTREAM_URL=http://127.0.0.1:$DEMO_UPSTREAM_PORT
GATEWAY_URL=http://127.0.0.1:$GATEWAY_PORT
GATEWAY_TLS_URL=https://127.0.0.1:$GATEWAY_TLS_PORT
GATEWAY_ADMIN_URL=http://127.0.0.1:$GATEWAY_ADMIN_PORT
METER_CONSUMER_URL=http://127.0.0.1:$METER_CONSUMER_PORT
BILLING_SYNC_URL=http://127.0.0.1:$BILLING_SYNC_PORT
PORTAL_URL=http://127.0.0.1:$PORTAL_PORT
declare -A PART_ADDRESS=(
    [kafka]="$KAFKA_ADDRESS"
    [clickhouse]="$CLICKHOUSE_URL"
    [redis]="$REDIS_URL"
    [stripe-mock]="$STRIPE_MOCK_URL"
    [demo-upstream]="$DEMO_UPSTREAM_URL tls :$DEMO_UPSTREAM_TLS_PORT"
    [gateway]="$GATEWAY_URL tls :$GATEWAY_TLS_PORT admin :$GATEWAY_ADMIN_PORT"
    [meter-consumer]="$METER_CONSUMER_URL"
    [billing-sync]="$BILLING_SYNC_URL"
    [portal]="$PORTAL_URL"
)
# Seconds a part may take from spawn to healthy. Generous: on 2 cores a cold JVM next to a
# cargo build is slow.
declare -A PART_READY_TIMEOUT=(
    [kafka]=180 [clickhouse]=90 [redis]=30 [stripe-mock]=60
    [demo-upstream]=60 [gateway]=120 [meter-consumer]=120 [billing-sync]=120 [portal]=60
)
STOP_TIMEOUT=20

# Tests that need the running stack live in tollgate-tests behind its `stack-tests` feature:
# `scripts/stack test` turns it on, a plain `cargo test` leaves it off. Only that crate has
# the feature, so turning it on rebuilds no service.
STACK_TEST_FEATURES=tollgate-tests/stack-tests

# part_fn VERB NAME: the function for VERB of part NAME. A node of a cluster part, NAME-<n>
# (kafka-2, redis-5), has one set of functions for all its nodes, VERB_NAME_node, which take
# the part's name as their argument; every part function is called with it.
part_fn() {
    local base=${2%-[0-9]}
    if [[ $base != "$2" ]] && declare -F "$1_${base//-/_}_node" >/dev/null; then
        printf '%s_%s_node' "$1" "${base//-/_}"
    else
        printf '%s_%s' "$1" "${2//-/_}"
    fi
}

# The node number of a cluster part's name: 2 for kafka-2.
node_of() { printf '%s\n' "${1##*-}"; }

# ---------------------------------------------------------------------------------------
# Processes. A pidfile holds "<pid> <start time>", the start time being field 22 of
# /proc/<pid>/stat (clock ticks since boot). A pid counts as ours only while a live process
# with that pid has that start time, so a reused pid or a pidfile left from before a reboot
# is never signalled.

proc_starttime() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2206 # splitting on spaces is the point
    local -a fields=($rest)
    case ${fields[0]} in Z | X | x) return 1 ;; esac
    printf '%s\n' "${fields[19]}"
}

pidfile_of() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }
logfile_of() { printf '%s/%s.log' "$LOG_DIR" "$1"; }

# Prints the pid of part $1 if its pidfile names a live process of ours, else nothing.
part_pid() {
    local pidfile pid="" start="" now
    pidfile=$(pidfile_of "$1")
    [[ -f $pidfile ]] || return 0
    read -r pid start <"$pidfile" || true
    [[ $pid =~ ^[0-9]+$ && -n $start ]] || return 0
    now=$(proc_starttime "$pid") || return 0
    [[ $now == "$start" ]] && printf '%s\n' "$pid"
    return 0
}

drop_stale_pidfile() {
    local pidfile
    pidfile=$(pidfile_of "$1")
    if [[ -f $pidfile && -z $(part_pid "$1") ]]; then
        rm -f "$pidfile"
    fi
}

rotate_log() {
    local file=$1 size
    [[ -f $file ]] || return 0
    size=$(stat -c %s "$file")
    if ((size > 64 * 1024 * 1024)); then
        mv -f "$file" "$file.1"
    fi
}

# spawn NAME CWD CMD...: starts CMD detached (own session, stdin from /dev/null, output
# appended to logs/NAME.log) and writes its pidfile. The child writes its own pid before
# exec'ing CMD, so the pid is right whether or not setsid has to fork. VAR=value entries in
# the array SPAWN_ENV are exported to CMD (not put on its command line, where any user could
# read a secret; the log names only the variables).
SPAWN_ENV=()
spawn() {
    local name=$1 cwd=$2
    shift 2
    local log pidfile marker pid start deadline
    log=$(logfile_of "$name")
    pidfile=$(pidfile_of "$name")
    marker="$RUN_DIR/$name.spawned"
    rm -f "$marker" "$marker.tmp"
    rotate_log "$log"
    local kv names=""
    for kv in "${SPAWN_ENV[@]}"; do names+=" ${kv%%=*}"; done
    printf '==== stack: %s starting %s in %s:%s %s\n' "$(date -Is)" "$name" "$cwd" \
        "${names:+ (env$names)}" "$*" >>"$log"
    (
        cd "$cwd" || exit 1
        for kv in "${SPAWN_ENV[@]}"; do export "${kv?}"; done
        # shellcheck disable=SC2016 # $$ and $0 belong to the child shell
        exec setsid -f bash -c 'echo "$$" >"$0.tmp" && mv -f "$0.tmp" "$0" && exec "$@"' "$marker" "$@"
    ) </dev/null >>"$log" 2>&1 9>&-
    deadline=$((SECONDS + 10))
    until [[ -s $marker ]]; do
        ((SECONDS < deadline)) || fail_part "$name" "did not start (no pid after 10 s)"
        sleep 0.05
    done
    pid=$(<"$marker")
    rm -f "$marker"
    start=$(proc_starttime "$pid") || fail_part "$name" "exited right after start"
    printf '%s %s\n' "$pid" "$start" >"$pidfile"
}

# Sends signal $2 to pid $1, and to its process group when it leads one (spawn made it so).
signal_pid() {
    local pgid
    pgid=$(ps -o pgid= -p "$1" 2>/dev/null | tr -d ' ') || true
    if [[ $pgid == "$1" ]]; then
        kill "-$2" -- "-$1" 2>/dev/null || true
    else
        kill "-$2" "$1" 2>/dev/null || true
    fi
}

# stop_part NAME: SIGTERM, up to STOP_TIMEOUT seconds, then SIGKILL; removes the pidfile.
stop_part() {
    local name=$1 pid pidfile deadline
    pidfile=$(pidfile_of "$name")
    pid=$(part_pid "$name")
    if [[ -z $pid ]]; then
        if [[ -f $pidfile ]]; then
            log "$name: not running (stale pidfile removed)"
            rm -f "$pidfile"
        fi
        return 0
    fi
    log "stopping $name (pid $pid)"
    signal_pid "$pid" TERM
    deadline=$((SECONDS + STOP_TIMEOUT))
    while [[ -n $(part_pid "$name") ]]; do
        if ((SECONDS >= deadline)); then
            warn "$name (pid $pid) still running after ${STOP_TIMEOUT}s: SIGKILL"
            signal_pid "$pid" KILL
            deadline=$((SECONDS + 10))
            while [[ -n $(part_pid "$name") ]]; do
                ((SECONDS < deadline)) || die "$name (pid $pid) survived SIGKILL"
                sleep 0.2
            done
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
}

# ---------------------------------------------------------------------------------------
# Ports

port_listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# Prints "name/pid" for each process listening on TCP port $1, one per line.
port_holders() {
    ss -Hltnp "sport = :$1" 2>/dev/null |
        grep -o '"[^"]*",pid=[0-9]*' |
        sed 's/^"\([^"]*\)",pid=\([0-9]*\)$/\1\/\2/' |
        sort -u || true
}

describe_holders() {
    local holders
    holders=$(port_holders "$1" | paste -sd, -)
    printf '%s' "${holders:-an unknown process}"
}

# Exits with "port P (NAME) is taken by ..." unless every port of part NAME is free.
# Debian's own redis/clickhouse service (started by the package) is stopped instead.
ensure_ports_free() {
    local name=$1 port
    for port in ${PART_PORTS[$name]}; do
        port_listening "$port" || continue
        stop_debian_instance "$name" "$port"
        port_listening "$port" || continue
        die "port $port ($name) is taken by $(describe_holders "$port"); stop it or free the port, then run 'scripts/stack up' again"
    done
}

# The system instance that Debian's redis-server / clickhouse-server package may start runs
# as the package's own user; ours run as the caller. Only that instance is ever stopped.
is_debian_instance() {
    local part=$1 pid=$2 user cmdline
    proc_starttime "$pid" >/dev/null || return 1 # gone, or a zombie
    user=$(stat -c %U "/proc/$pid" 2>/dev/null) || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case $part in
    redis) [[ $user == redis || $cmdline == *"/etc/redis/"* ]] ;;
    clickhouse) [[ $user == clickhouse || $cmdline == *"/etc/clickhouse-server/"* ]] ;;
    *) return 1 ;;
    esac
}

# wait_gone PART PID SECONDS: true once PID is no longer that Debian instance.
wait_gone() {
    local deadline=$((SECONDS + $3))
    while [[ -d /proc/$2 ]] && is_debian_instance "$1" "$2"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

stop_debian_instance() {
    local part=$1 port=$2 service holder pid
    case $part in
    redis) service=redis-server ;;
    clickhouse) service=clickhouse-server ;;
    *) return 0 ;;
    esac
    for holder in $(port_holders "$port"); do
        pid=${holder##*/}
        is_debian_instance "$part" "$pid" || continue
        log "port $port is held by Debian's system $service ($holder), which the stack does not use: stopping it"
        if command -v service >/dev/null 2>&1 && [[ -x /etc/init.d/$service ]]; then
            as_root service "$service" stop >/dev/null 2>&1 || true
        fi
        if ! wait_gone "$part" "$pid" 10; then
            warn "Debian's $service (pid $pid) still runs after 'service $service stop': SIGTERM"
            as_root kill -TERM "$pid" 2>/dev/null || true
            if ! wait_gone "$part" "$pid" "$STOP_TIMEOUT"; then
                warn "Debian's $service (pid $pid) ignored SIGTERM: SIGKILL"
                as_root kill -KILL "$pid" 2>/dev/null || true
                wait_gone "$part" "$pid" 10 || die "could not stop Debian's $service (pid $pid)"
            fi
        fi
    done
    return 0
}

# ---------------------------------------------------------------------------------------
# Readiness

# fail_part NAME REASON: error plus the tail of the part's log(s), then exit 1.
fail_part() {
    local name=$1 reason=$2 file
    printf 'stack: error: %s: %s\n' "$name" "$reason" >&2
    for file in $(logfile_of "$name") $(extra_logs_of "$name"); do
        [[ -s $file ]] || continue
        printf 'stack: ---- last 40 lines of %s ----\n' "$file" >&2
        tail -n 40 "$file" >&2
    done
    printf "stack: ---- (what is running stays running; 'scripts/stack down' stops it)\n" >&2
    exit 1
}

extra_logs_of() {
    case $1 in
    clickhouse) printf '%s\n' "$STACK_DIR/clickhouse/log/clickhouse-server.err.log" ;;
    clickhouse-[0-9]) printf '%s\n' "$CLUSTER_DIR/$1/log/clickhouse-server.err.log" ;;
    esac
}

# wait_ready NAME: polls health_NAME until it passes, the process exits, or the part's
# deadline passes.
wait_ready() {
    local name=$1 timeout start deadline health
    timeout=${PART_READY_TIMEOUT[$name]}
    start=$SECONDS
    deadline=$((SECONDS + timeout))
    health=$(part_fn health "$name")
    while :; do
        [[ -n $(part_pid "$name") ]] || fail_part "$name" "exited during startup"
        if "$health" "$name"; then
            log "$name ready after $((SECONDS - start))s (pid $(part_pid "$name"))"
            return 0
        fi
        ((SECONDS < deadline)) || fail_part "$name" "not ready after ${timeout}s"
        sleep 0.5
    done
}

# http_status URL [curl args...]: prints the HTTP status code (000 when nothing answers).
http_status() {
    local url=$1
    shift
    curl --noproxy '*' -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" "$url" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------
# Files

# render TEMPLATE OUT KEY=VALUE...: copies TEMPLATE to OUT, replacing each @KEY@ by VALUE.
render() {
    local template=$1 out=$2 text pair
    shift 2
    text=$(<"$template")
    for pair in "$@"; do
        text=${text//@${pair%%=*}@/${pair#*=}}
    done
    printf '%s\n' "$text" >"$out.tmp"
    mv -f "$out.tmp" "$out"
}

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root for: $*"
    fi
}
