# shellcheck shell=bash
# The servers Tollgate uses: Kafka (KRaft, from Maven jars), ClickHouse and Redis (Debian
# packages) and stripe-mock (Go module). For each: prepare_*, start_*, health_*, after_*.
# Sourced by scripts/stack, never run.

# ---------------------------------------------------------------------------------------
# Kafka: one node, broker + controller, on $KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT)

# Topics Tollgate expects: "name partitions config...", each on KAFKA_REPLICATION nodes.
KAFKA_REPLICATION=1
KAFKA_TOPICS=(
    "tollgate.keys 1 cleanup.policy=compact"
    "tollgate.usage.v1 6 retention.ms=604800000"
    "tollgate.usage.v1.dlq 3 retention.ms=2592000000"
)

kafka_dir() { printf '%s/kafka\n' "$STACK_DIR"; }

# kafka_tool CLASS ARGS...: runs one of Kafka's command line tools on the resolved jars.
kafka_tool() {
    local dir
    dir=$(kafka_dir)
    "$(java_bin)" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$dir/tools-log4j2.xml" -cp "$dir/libs/*" "$@" 9>&-
}

prepare_kafka() {
    local dir log cluster_id
    dir=$(kafka_dir)
    log=$(logfile_of kafka)
    check_java
    ensure_libs kafka
    mkdir -p "$dir/data"
    render "$STACK_SCRIPTS/kafka/server.properties.in" "$dir/server.properties" \
        "BROKER_PORT=$KAFKA_PORT" "CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT" "DATA_DIR=$dir/data"
    cp -f "$STACK_SCRIPTS/kafka/log4j2.xml" "$dir/log4j2.xml"
    cp -f "$STACK_SCRIPTS/kafka/tools-log4j2.xml" "$dir/tools-log4j2.xml"
    [[ -f $dir/data/meta.properties ]] && return 0

    # First start: format the KRaft storage once, as a single-node dynamic quorum.
    if [[ ! -s $dir/cluster-id ]]; then
        cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$log") ||
            fail_part kafka "kafka-storage random-uuid failed"
        printf '%s\n' "$cluster_id" >"$dir/cluster-id"
    fi
    cluster_id=$(<"$dir/cluster-id")
    log "formatting Kafka storage (cluster id $cluster_id)"
    kafka_tool kafka.tools.StorageTool format --config "$dir/server.properties" \
        --cluster-id "$cluster_id" --standalone --ignore-formatted >>"$log" 2>&1 ||
        fail_part kafka "kafka-storage format failed"
}

start_kafka() {
    local dir
    dir=$(kafka_dir)
    # Kafka's own scripts default to -Xmx1G; half of that is plenty for tests on 2 cores.
    spawn kafka "$dir" "$(java_bin)" -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$dir/log4j2.xml" "-Dkafka.logs.dir=$LOG_DIR" \
        -cp "$dir/libs/*" kafka.Kafka "$dir/server.properties"
}

health_kafka() { kafka_answers "$KAFKA_PORT"; }

# kafka_answers PORT: the broker on PORT answers an ApiVersions request (v0): the response
# starts with a 4-byte size, our correlation id (7) and error code 0.
kafka_answers() {
    local reply
    reply=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "\x00\x00\x00\x0c\x00\x12\x00\x00\x00\x00\x00\x07\x00\x02tg" >&3
        head -c 10 <&3' _ "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n') || true
    [[ ${#reply} -eq 20 && ${reply:8:12} == 000000070000 ]]
}

# Where the topic list last applied is recorded: beside the data it was applied to.
topics_stamp() { printf '%s/topics.stamp\n' "$(kafka_dir)"; }

# Creates the missing Tollgate topics. Skipped while the topic list is unchanged since the
# last success against this data directory (the stamp goes with the data on --purge).
after_kafka() {
    local stamp spec existing entry topic partitions topic_configs kv
    stamp=$(topics_stamp)
    spec=$(printf '%s\n' "${KAFKA_TOPICS[@]}")
    [[ -f $stamp && $(<"$stamp") == "$spec" ]] && return 0
    existing=$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_ADDRESS" --list) ||
        fail_part kafka "could not list topics"
    for entry in "${KAFKA_TOPICS[@]}"; do
        read -r topic partitions topic_configs <<<"$entry"
        if grep -qxF "$topic" <<<"$existing"; then
            # Exists (from an earlier run): make sure its configs are the ones listed here.
            kafka_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "$KAFKA_ADDRESS" \
                --alter --entity-type topics --entity-name "$topic" \
                --add-config "${topic_configs// /,}" >/dev/null ||
                fail_part kafka "could not set the configs of topic $topic"
            log "kafka topic $topic exists (configs $topic_configs applied)"
        else
            local -a create_args=()
            for kv in $topic_configs; do create_args+=(--config "$kv"); done
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_ADDRESS" \
                --create --if-not-exists --topic "$topic" --partitions "$partitions" \
                --replication-factor "$KAFKA_REPLICATION" "${create_args[@]}" >/dev/null ||
                fail_part kafka "could not create topic $topic"
            log "kafka topic $topic created ($partitions partitions, $topic_configs)"
        fi
    done
    printf '%s\n' "$spec" >"$stamp"
}

# ---------------------------------------------------------------------------------------
# ClickHouse (Debian's 18.16) with its own config and data under the state directory

clickhouse_dir() { printf '%s/clickhouse\n' "$STACK_DIR"; }

clickhouse_server_cmd() {
    if command -v clickhouse-server >/dev/null 2>&1; then
        command -v clickhouse-server
    elif command -v clickhouse >/dev/null 2>&1; then
        printf '%s server\n' "$(command -v clickhouse)"
    else
        die "no clickhouse-server binary (Debian package clickhouse-server)"
    fi
}

prepare_clickhouse() {
    local dir
    dir=$(clickhouse_dir)
    mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
    render "$STACK_SCRIPTS/clickhouse/config.xml.in" "$dir/config.xml" \
        "CH_DIR=$dir" "HTTP_PORT=$CLICKHOUSE_HTTP_PORT" "TCP_PORT=$CLICKHOUSE_TCP_PORT"
    cp -f "$STACK_SCRIPTS/clickhouse/users.xml" "$dir/users.xml"
}

start_clickhouse() {
    local dir
    dir=$(clickhouse_dir)
    # shellcheck disable=SC2046 # "clickhouse server" is two words on purpose
    spawn clickhouse "$dir" $(clickhouse_server_cmd) "--config-file=$dir/config.xml"
}

health_clickhouse() {
    [[ $(curl --noproxy '*' -s --max-time 3 "$CLICKHOUSE_URL/ping" 2>/dev/null) == "Ok." ]]
}

# ---------------------------------------------------------------------------------------
# Redis (Debian), in memory only

prepare_redis() { mkdir -p "$STACK_DIR/redis"; }

start_redis() {
    spawn redis "$STACK_DIR/redis" "$(command -v redis-server)" --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save '' --appendonly no --dir "$STACK_DIR/redis" --daemonize no --protected-mode yes
}

health_redis() {
    [[ $(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# ---------------------------------------------------------------------------------------
# stripe-mock

prepare_stripe_mock() {
    ensure_stripe_mock
    mkdir -p "$STACK_DIR/stripe-mock"
}

start_stripe_mock() {
    spawn stripe-mock "$STACK_DIR/stripe-mock" "$(stripe_mock_bin)" \
        -http-addr "127.0.0.1:$STRIPE_MOCK_PORT" -https-addr "127.0.0.1:$STRIPE_MOCK_HTTPS_PORT"
}

health_stripe_mock() {
    [[ $(http_status "$STRIPE_MOCK_URL/v1/customers" -u sk_test_123:) == 200 ]]
}
