# shellcheck shell=bash disable=SC2034 # the ports are used by the files that source this one
# The native stack's loopback ports, defined once. scripts/stack (its parts, health checks
# and the addresses it exports to the tests) and .ci/run derive theirs from these; the
# example configs in config/ are checked against them by tests/tests/compose.rs.
# Sourced, never run.

KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
CLICKHOUSE_HTTP_PORT=8123
CLICKHOUSE_TCP_PORT=9000
REDIS_PORT=6379
STRIPE_MOCK_PORT=12111
STRIPE_MOCK_HTTPS_PORT=12112
DEMO_UPSTREAM_PORT=8090
DEMO_UPSTREAM_TLS_PORT=8091
GATEWAY_PORT=8080
GATEWAY_TLS_PORT=8443
GATEWAY_ADMIN_PORT=8081
METER_CONSUMER_PORT=9101
BILLING_SYNC_PORT=9102
PORTAL_PORT=8082

# Every port above, for checks that nothing is left listening.
STACK_PORTS=(
    "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$CLICKHOUSE_HTTP_PORT" "$CLICKHOUSE_TCP_PORT"
    "$REDIS_PORT" "$STRIPE_MOCK_PORT" "$STRIPE_MOCK_HTTPS_PORT" "$DEMO_UPSTREAM_PORT"
    "$DEMO_UPSTREAM_TLS_PORT" "$GATEWAY_PORT" "$GATEWAY_TLS_PORT" "$GATEWAY_ADMIN_PORT" "$METER_CONSUMER_PORT"
    "$BILLING_SYNC_PORT" "$PORTAL_PORT"
)
