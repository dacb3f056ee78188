# shellcheck shell=bash disable=SC2034 # the tables are read by scripts/stack and lib.sh
# The cluster stack, `scripts/stack ... --cluster`: the engines Tollgate uses as an operator
# who outgrew one machine runs them, all on loopback with ports of their own (ports.sh) and
# state in <state dir>/cluster, so it runs beside the single-node stack.
#
#   zookeeper            one ZooKeeper server (jars from Maven), for ClickHouse replication
#   kafka-1..3           three KRaft nodes (broker + controller each), replication factor 3,
#                        min.insync.replicas 2
#   clickhouse-1..2      two ClickHouse 18.16 replicas of one shard (cluster `tollgate`)
#   redis-1..6           a Redis Cluster of 3 masters and 3 replicas
#   stripe-mock          as in the single-node stack, on its own ports
#   demo-upstream        as in the single-node stack, on its own ports
#   gateway-1..2         two gateways: limits on the Redis Cluster, usage to the Kafka nodes
#   meter-consumer-1..2  two members of one group, each writing to its own ClickHouse replica
#                        (tables replicated, `clickhouse.cluster = "tollgate"`)
#   billing-sync-1..2    two instances, each on its own replica; one active at a time, the
#                        other standing by (the lease: a consumer group on one partition)
#
# Sourced by scripts/stack after the single-node parts, whose tables it replaces; never run.

CLUSTER_DIR=$STACK_DIR/cluster
# `scripts/stack test --cluster` builds and runs the cluster suite.
STACK_TEST_FEATURES=tollgate-tests/cluster-tests
RUN_DIR=$CLUSTER_DIR/run
LOG_DIR=$CLUSTER_DIR/logs
mkdir -p "$RUN_DIR" "$LOG_DIR"

# ZooKeeper is up before any ClickHouse starts: a replica whose tables are replicated does
# not start without it.
FIRST_PARTS=(zookeeper)
INFRA_PARTS=(zookeeper kafka-1 kafka-2 kafka-3 clickhouse-1 clickhouse-2
    redis-1 redis-2 redis-3 redis-4 redis-5 redis-6 stripe-mock)
TOLLGATE_PARTS=(demo-upstream gateway-1 gateway-2 meter-consumer-1 meter-consumer-2 billing-sync-1 billing-sync-2)
STOP_ORDER=(gateway-2 gateway-1 meter-consumer-2 meter-consumer-1 billing-sync-2 billing-sync-1 demo-upstream stripe-mock redis-6 redis-5 redis-4 redis-3 redis-2 redis-1
    clickhouse-2 clickhouse-1 kafka-3 kafka-2 kafka-1 zookeeper)
STOP_TOGETHER=(kafka-1 kafka-2 kafka-3)

join_by() {
    local sep=$1 out=$2
    shift 2
    for item in "$@"; do out+="$sep$item"; done
    printf '%s\n' "$out"
}

# What the tests and services are given: every node, comma-separated.
KAFKA_ADDRESS=$(join_by , "${CLUSTER_KAFKA_PORTS[@]/#/127.0.0.1:}")
CLICKHOUSE_URLS=$(join_by , "${CLUSTER_CLICKHOUSE_HTTP_PORTS[@]/#/http://127.0.0.1:}")
REDIS_URL=$(join_by , "${CLUSTER_REDIS_PORTS[@]/#/redis://127.0.0.1:}")
STRIPE_MOCK_PORT=$CLUSTER_STRIPE_MOCK_PORT
STRIPE_MOCK_HTTPS_PORT=$CLUSTER_STRIPE_MOCK_HTTPS_PORT
STRIPE_MOCK_URL=http://127.0.0.1:$STRIPE_MOCK_PORT
ZOOKEEPER_ADDRESS=127.0.0.1:$CLUSTER_ZOOKEEPER_PORT

# Topics as in the single-node stack, on all three nodes (a usage or key record is
# acknowledged once two of them hold it), and the billing-syncs' lease.
KAFKA_REPLICATION=3
KAFKA_TOPICS=(
    "tollgate.keys 1 cleanup.policy=compact min.insync.replicas=2"
    "tollgate.usage.v1 6 retention.ms=604800000 min.insync.replicas=2"
    "tollgate.usage.v1.dlq 3 retention.ms=2592000000 min.insync.replicas=2"
    "tollgate.billing.lease 1 min.insync.replicas=2"
)

PART_PORTS=() PART_ADDRESS=() PART_READY_TIMEOUT=()
declare -A PART_PORTS PART_ADDRESS PART_READY_TIMEOUT
PART_PORTS[zookeeper]=$CLUSTER_ZOOKEEPER_PORT
PART_ADDRESS[zookeeper]=$ZOOKEEPER_ADDRESS
PART_READY_TIMEOUT[zookeeper]=60
for i in 1 2 3; do
    PART_PORTS[kafka-$i]="${CLUSTER_KAFKA_PORTS[i - 1]} ${CLUSTER_KAFKA_CONTROLLER_PORTS[i - 1]}"
    PART_ADDRESS[kafka-$i]=127.0.0.1:${CLUSTER_KAFKA_PORTS[i - 1]}
    PART_READY_TIMEOUT[kafka-$i]=180
done
for i in 1 2; do
    PART_PORTS[clickhouse-$i]="${CLUSTER_CLICKHOUSE_HTTP_PORTS[i - 1]} ${CLUSTER_CLICKHOUSE_TCP_PORTS[i - 1]} ${CLUSTER_CLICKHOUSE_INTERSERVER_PORTS[i - 1]}"
    PART_ADDRESS[clickhouse-$i]=http://127.0.0.1:${CLUSTER_CLICKHOUSE_HTTP_PORTS[i - 1]}
    PART_READY_TIMEOUT[clickhouse-$i]=90
done
for i in 1 2 3 4 5 6; do
    PART_PORTS[redis-$i]="${CLUSTER_REDIS_PORTS[i - 1]} $((CLUSTER_REDIS_PORTS[i - 1] + 10000))"
    PART_ADDRESS[redis-$i]=redis://127.0.0.1:${CLUSTER_REDIS_PORTS[i - 1]}
    PART_READY_TIMEOUT[redis-$i]=30
done
PART_PORTS[stripe-mock]="$STRIPE_MOCK_PORT $STRIPE_MOCK_HTTPS_PORT"
PART_ADDRESS[stripe-mock]=$STRIPE_MOCK_URL
PART_READY_TIMEOUT[stripe-mock]=60
DEMO_UPSTREAM_PORT=$CLUSTER_DEMO_UPSTREAM_PORT
DEMO_UPSTREAM_TLS_PORT=$CLUSTER_DEMO_UPSTREAM_TLS_PORT
DEMO_UPSTREAM_URL=http://127.0.0.1:$DEMO_UPSTREAM_PORT
PART_PORTS[demo-upstream]="$DEMO_UPSTREAM_PORT $DEMO_UPSTREAM_TLS_PORT"
PART_ADDRESS[demo-upstream]="$DEMO_UPSTREAM_URL tls :$DEMO_UPSTREAM_TLS_PORT"
PART_READY_TIMEOUT[demo-upstream]=60
GATEWAY_URLS=$(join_by , "${CLUSTER_GATEWAY_PORTS[@]/#/http://127.0.0.1:}")
GATEWAY_ADMIN_URLS=$(join_by , "${CLUSTER_GATEWAY_ADMIN_PORTS[@]/#/http://127.0.0.1:}")
for i in 1 2; do
    PART_PORTS[gateway-$i]="${CLUSTER_GATEWAY_PORTS[i - 1]} ${CLUSTER_GATEWAY_ADMIN_PORTS[i - 1]}"
    PART_ADDRESS[gateway-$i]="http://127.0.0.1:${CLUSTER_GATEWAY_PORTS[i - 1]} admin :${CLUSTER_GATEWAY_ADMIN_PORTS[i - 1]}"
    PART_READY_TIMEOUT[gateway-$i]=120
    PART_PORTS[meter-consumer-$i]=${CLUSTER_METER_CONSUMER_PORTS[i - 1]}
    PART_ADDRESS[meter-consumer-$i]="http://127.0.0.1:${CLUSTER_METER_CONSUMER_PORTS[i - 1]} -> clickhouse-$i"
    PART_READY_TIMEOUT[meter-consumer-$i]=120
    PART_PORTS[billing-sync-$i]=${CLUSTER_BILLING_SYNC_PORTS[i - 1]}
    PART_ADDRESS[billing-sync-$i]="http://127.0.0.1:${CLUSTER_BILLING_SYNC_PORTS[i - 1]} -> clickhouse-$i"
    PART_READY_TIMEOUT[billing-sync-$i]=120
done

# ---------------------------------------------------------------------------------------
# ZooKeeper

prepare_zookeeper() {
    local dir=$CLUSTER_DIR/zookeeper
    check_java
    ensure_libs zookeeper
    mkdir -p "$dir/data"
    render "$STACK_SCRIPTS/zookeeper/zoo.cfg.in" "$dir/zoo.cfg" \
        "DATA_DIR=$dir/data" "PORT=$CLUSTER_ZOOKEEPER_PORT"
}

start_zookeeper() {
    local dir=$CLUSTER_DIR/zookeeper
    spawn zookeeper "$dir" "$(java_bin)" -Xms64m -Xmx256m -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true -cp "$STACK_DIR/zookeeper/libs/*" \
        org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg"
}

# Healthy once it serves sessions: `srvr` names the mode only then (`ruok` answers `imok` while
# the server is still loading its data and closing every session).
health_zookeeper() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf srvr >&3 && cat <&3' \
        _ "$CLUSTER_ZOOKEEPER_PORT" 2>/dev/null | grep -q '^Mode: '
}

# ---------------------------------------------------------------------------------------
# Kafka: three nodes, one static controller quorum

prepare_kafka_node() {
    local i dir log cluster_id voters=""
    i=$(node_of "$1")
    dir=$CLUSTER_DIR/$1
    log=$(logfile_of "$1")
    check_java
    ensure_libs kafka
    mkdir -p "$dir/data"
    for n in 1 2 3; do voters+="${voters:+,}$n@127.0.0.1:${CLUSTER_KAFKA_CONTROLLER_PORTS[n - 1]}"; done
    render "$STACK_SCRIPTS/kafka/cluster.properties.in" "$dir/server.properties" \
        "NODE_ID=$i" "VOTERS=$voters" "BROKER_PORT=${CLUSTER_KAFKA_PORTS[i - 1]}" \
        "CONTROLLER_PORT=${CLUSTER_KAFKA_CONTROLLER_PORTS[i - 1]}" "DATA_DIR=$dir/data"
    cp -f "$STACK_SCRIPTS/kafka/log4j2.xml" "$dir/log4j2.xml"
    cp -f "$STACK_SCRIPTS/kafka/tools-log4j2.xml" "$(kafka_dir)/tools-log4j2.xml"
    [[ -f $dir/data/meta.properties ]] && return 0

    # First start: every node formats its storage with the one cluster id.
    if [[ ! -s $CLUSTER_DIR/kafka-cluster-id ]]; then
        cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$log") ||
            fail_part "$1" "kafka-storage random-uuid failed"
        printf '%s\n' "$cluster_id" >"$CLUSTER_DIR/kafka-cluster-id"
    fi
    cluster_id=$(<"$CLUSTER_DIR/kafka-cluster-id")
    log "formatting $1 storage (cluster id $cluster_id)"
    kafka_tool kafka.tools.StorageTool format --config "$dir/server.properties" \
        --cluster-id "$cluster_id" --ignore-formatted >>"$log" 2>&1 ||
        fail_part "$1" "kafka-storage format failed"
}

start_kafka_node() {
    local dir=$CLUSTER_DIR/$1
    # Three JVMs on two cores: a smaller heap than the single node's.
    spawn "$1" "$dir" "$(java_bin)" -Xms128m -Xmx384m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$dir/log4j2.xml" "-Dkafka.logs.dir=$LOG_DIR" \
        -cp "$STACK_DIR/kafka/libs/*" kafka.Kafka "$dir/server.properties"
}

health_kafka_node() { kafka_answers "${CLUSTER_KAFKA_PORTS[$(node_of "$1") - 1]}"; }

# Once the last node is up the quorum can take writes: the topics, on all three.
after_kafka_node() {
    [[ $1 == kafka-3 ]] || return 0
    after_kafka
}

topics_stamp() { printf '%s/kafka-topics.stamp\n' "$CLUSTER_DIR"; }

# ---------------------------------------------------------------------------------------
# ClickHouse: two replicas of one shard

prepare_clickhouse_node() {
    local i dir
    i=$(node_of "$1")
    dir=$CLUSTER_DIR/$1
    mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log" "$dir/config.d"
    render "$STACK_SCRIPTS/clickhouse/config.xml.in" "$dir/config.xml" "CH_DIR=$dir" \
        "HTTP_PORT=${CLUSTER_CLICKHOUSE_HTTP_PORTS[i - 1]}" "TCP_PORT=${CLUSTER_CLICKHOUSE_TCP_PORTS[i - 1]}"
    render "$STACK_SCRIPTS/clickhouse/replication.xml.in" "$dir/config.d/replication.xml" \
        "INTERSERVER_PORT=${CLUSTER_CLICKHOUSE_INTERSERVER_PORTS[i - 1]}" \
        "ZOOKEEPER_PORT=$CLUSTER_ZOOKEEPER_PORT" "REPLICA=replica-$i" \
        "TCP_PORT_1=${CLUSTER_CLICKHOUSE_TCP_PORTS[0]}" "TCP_PORT_2=${CLUSTER_CLICKHOUSE_TCP_PORTS[1]}"
    cp -f "$STACK_SCRIPTS/clickhouse/users.xml" "$dir/users.xml"
}

start_clickhouse_node() {
    local dir=$CLUSTER_DIR/$1
    # shellcheck disable=SC2046 # "clickhouse server" is two words on purpose
    spawn "$1" "$dir" $(clickhouse_server_cmd) "--config-file=$dir/config.xml"
}

# Healthy when it answers and its ZooKeeper session is up (it can create replicated tables).
health_clickhouse_node() {
    local url=${PART_ADDRESS[$1]}
    [[ $(curl --noproxy '*' -s --max-time 3 "$url/?query=SELECT+count()+FROM+system.zookeeper+WHERE+path%3D'/'" 2>/dev/null) =~ ^[1-9] ]]
}

# ---------------------------------------------------------------------------------------
# Redis Cluster: six nodes; after the last, the cluster is created once (3 masters, one
# replica each) and waited for until every slot is served.

prepare_redis_node() { mkdir -p "$CLUSTER_DIR/$1"; }

start_redis_node() {
    local port=${CLUSTER_REDIS_PORTS[$(node_of "$1") - 1]}
    # nodes.conf stays in the node's directory: a restarted node rejoins the cluster it knew.
    spawn "$1" "$CLUSTER_DIR/$1" "$(command -v redis-server)" --bind 127.0.0.1 --port "$port" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
        --save '' --appendonly no --dir "$CLUSTER_DIR/$1" --daemonize no --protected-mode yes
}

health_redis_node() {
    [[ $(timeout 3 redis-cli -h 127.0.0.1 -p "${CLUSTER_REDIS_PORTS[$(node_of "$1") - 1]}" ping 2>/dev/null) == PONG ]]
}

redis_cluster_info() { timeout 3 redis-cli -h 127.0.0.1 -p "${CLUSTER_REDIS_PORTS[0]}" cluster info 2>/dev/null; }

after_redis_node() {
    [[ $1 == redis-6 ]] || return 0
    if ! redis_cluster_info | grep -q '^cluster_slots_assigned:16384'; then
        log "creating the Redis Cluster (3 masters, 3 replicas)"
        timeout 60 redis-cli --cluster create "${CLUSTER_REDIS_PORTS[@]/#/127.0.0.1:}" \
            --cluster-replicas 1 --cluster-yes >>"$(logfile_of redis-6)" 2>&1 ||
            fail_part redis-6 "redis-cli --cluster create failed"
    fi
    local deadline=$((SECONDS + 60))
    until redis_cluster_info | grep -q '^cluster_state:ok'; do
        ((SECONDS < deadline)) || fail_part redis-1 "the Redis Cluster is not ok after 60s"
        sleep 0.5
    done
    log "redis cluster ok: every slot served"
}

# ---------------------------------------------------------------------------------------
# Tollgate: the single-node stack's demo upstream on the cluster's ports (its functions read
# the DEMO_UPSTREAM_* set above), two gateways and two meter-consumers

prepare_gateway_node() {
    require_tollgate tollgate-gateway config/gateway.toml
    ensure_local_ca
    mkdir -p "$CLUSTER_DIR/$1"
}

# The example settings, pointed at the cluster: each gateway its own id (its Kafka
# transactional id) and spool; limits on the Redis Cluster, refusing while a slot has no
# master, so two gateways never admit past an allowance.
start_gateway_node() {
    local i token
    i=$(node_of "$1")
    token=$(resolve_admin_token)
    run_tollgate "$1" tollgate-gateway "TOLLGATE_ADMIN_TOKEN=$token" \
        "TOLLGATE_SERVICE__ID=gw-cluster-$i" \
        "TOLLGATE_PUBLIC__LISTEN=127.0.0.1:${CLUSTER_GATEWAY_PORTS[i - 1]}" \
        "TOLLGATE_ADMIN__LISTEN=127.0.0.1:${CLUSTER_GATEWAY_ADMIN_PORTS[i - 1]}" \
        "TOLLGATE_KAFKA__BROKERS=$KAFKA_ADDRESS" \
        "TOLLGATE_EVENTS__SPOOL_DIR=$CLUSTER_DIR/$1/spool" \
        "TOLLGATE_LIMITS__BACKEND=redis_cluster" "TOLLGATE_LIMITS__REDIS_URL=$REDIS_URL" \
        "TOLLGATE_LIMITS__ON_REDIS_ERROR=closed" \
        "TOLLGATE_ROUTES__0__UPSTREAM=$DEMO_UPSTREAM_URL" "TOLLGATE_ROUTES__1__UPSTREAM=$DEMO_UPSTREAM_URL" \
        "TOLLGATE_ROUTES__2__UPSTREAM=https://127.0.0.1:$DEMO_UPSTREAM_TLS_PORT" \
        "TOLLGATE_ROUTES__2__UPSTREAM_CA_FILE=$(tls_dir)/ca.pem" \
        -- --config "$REPO/config/gateway.toml"
}

health_gateway_node() { tollgate_health "http://127.0.0.1:${CLUSTER_GATEWAY_ADMIN_PORTS[$(node_of "$1") - 1]}/readyz"; }

prepare_meter_consumer_node() { require_tollgate tollgate-meter-consumer config/meter-consumer.toml; }

# Member N writes to replica N; both are one group with static membership ids of their own.
start_meter_consumer_node() {
    local i
    i=$(node_of "$1")
    run_tollgate "$1" tollgate-meter-consumer \
        "TOLLGATE_KAFKA__BROKERS=$KAFKA_ADDRESS" \
        "TOLLGATE_TOPICS__INSTANCE_ID=meter-cluster-$i" \
        "TOLLGATE_CLICKHOUSE__URL=http://127.0.0.1:${CLUSTER_CLICKHOUSE_HTTP_PORTS[i - 1]}" \
        "TOLLGATE_CLICKHOUSE__CLUSTER=tollgate" \
        "TOLLGATE_ADMIN__LISTEN=127.0.0.1:${CLUSTER_METER_CONSUMER_PORTS[i - 1]}" \
        -- --config "$REPO/config/meter-consumer.toml"
}

health_meter_consumer_node() { tollgate_health "http://127.0.0.1:${CLUSTER_METER_CONSUMER_PORTS[$(node_of "$1") - 1]}/healthz"; }

prepare_billing_sync_node() { require_tollgate tollgate-billing-sync config/billing-sync.toml; }

# Both join the lease group; the one holding its partition bills, the other stands by.
start_billing_sync_node() {
    local i
    i=$(node_of "$1")
    run_tollgate "$1" tollgate-billing-sync \
        "TOLLGATE_STRIPE_API_KEY=${TOLLGATE_STRIPE_API_KEY:-sk_test_123}" \
        "TOLLGATE_STRIPE__API_BASE=$STRIPE_MOCK_URL/" \
        "TOLLGATE_CLICKHOUSE__URL=http://127.0.0.1:${CLUSTER_CLICKHOUSE_HTTP_PORTS[i - 1]}" \
        "TOLLGATE_CLICKHOUSE__CLUSTER=tollgate" \
        "TOLLGATE_ADMIN__LISTEN=127.0.0.1:${CLUSTER_BILLING_SYNC_PORTS[i - 1]}" \
        "TOLLGATE_PROVISIONING__KAFKA__BROKERS=$KAFKA_ADDRESS" \
        "TOLLGATE_LEASE__KAFKA__BROKERS=$KAFKA_ADDRESS" \
        -- --config "$REPO/config/billing-sync.toml"
}

health_billing_sync_node() { tollgate_health "http://127.0.0.1:${CLUSTER_BILLING_SYNC_PORTS[$(node_of "$1") - 1]}/healthz"; }
