# shellcheck shell=bash disable=SC2034 # SPAWN_ENV is read by spawn (lib.sh)
# Tollgate's own processes, built by cargo from this repository: the demo upstream, the
# gateway, the meter consumer, billing sync and the tenant portal. Each runs with the repository root as its
# working directory and its config from config/. Sourced by scripts/stack, never run.

# run_tollgate PART BINARY [VAR=value...] -- ARGS...: spawns target/release/BINARY with the
# caller's environment (so its TOLLGATE_* overrides pass through), the common variables and
# the given ones.
run_tollgate() {
    local name=$1 bin
    bin=$(tollgate_bin "$2")
    shift 2
    # NO_COLOR: plain log files (tracing-subscriber honours it).
    local -a vars=("RUST_LOG=${RUST_LOG:-info}" "RUST_BACKTRACE=${RUST_BACKTRACE:-1}" "NO_COLOR=${NO_COLOR:-1}")
    while (($# > 0)) && [[ $1 != -- ]]; do
        vars+=("$1")
        shift
    done
    (($# > 0)) && shift
    SPAWN_ENV=("${vars[@]}")
    spawn "$name" "$REPO" "$bin" "$@"
    SPAWN_ENV=()
}

# require_tollgate BINARY [CONFIG]: the build made BINARY, and CONFIG exists.
require_tollgate() {
    local bin
    bin=$(tollgate_bin "$1")
    [[ -x $bin ]] || die "$bin is missing after the build (no [[bin]] named $1 in the workspace?)"
    [[ -z ${2:-} || -f $REPO/$2 ]] || die "$REPO/$2 is missing"
}

tollgate_health() { [[ $(http_status "$1") == 200 ]]; }

# The stack's certificates: a local CA (made once, kept in the state directory) and a server
# certificate for 127.0.0.1 and localhost that the gateway's and the demo upstream's TLS
# listeners serve. Clients trust <state dir>/tls/ca.pem (`status` prints it).
tls_dir() { printf '%s/tls\n' "$STACK_DIR"; }
ensure_local_ca() {
    require_tollgate tollgate
    "$(tollgate_bin tollgate)" tls local-ca --dir "$(tls_dir)" >/dev/null ||
        die "cannot make the stack's certificates in $(tls_dir)"
}

# Demo upstream: answers every request with 200 and a JSON body, over HTTP and TLS.
prepare_demo_upstream() {
    require_tollgate tollgate-demo-upstream
    ensure_local_ca
}
start_demo_upstream() {
    run_tollgate demo-upstream tollgate-demo-upstream -- --listen "127.0.0.1:$DEMO_UPSTREAM_PORT" \
        --tls-listen "127.0.0.1:$DEMO_UPSTREAM_TLS_PORT" \
        --tls-cert "$(tls_dir)/server.pem" --tls-key "$(tls_dir)/server.key"
}
health_demo_upstream() { tollgate_health "$DEMO_UPSTREAM_URL/"; }

# Gateway: public listener, admin listener (readyz, admin API). Healthy only once ready:
# the keys topic is replayed, so it can serve a tenant.
# With TLS on $GATEWAY_TLS_PORT beside plain HTTP; the `secure` route (config/gateway.toml)
# reaches the demo upstream's TLS listener trusting the local CA.
prepare_gateway() {
    require_tollgate tollgate-gateway config/gateway.toml
    ensure_local_ca
}
start_gateway() {
    local token
    token=$(resolve_admin_token)
    run_tollgate gateway tollgate-gateway "TOLLGATE_ADMIN_TOKEN=$token" \
        "TOLLGATE_PUBLIC__TLS__LISTEN=127.0.0.1:$GATEWAY_TLS_PORT" \
        "TOLLGATE_PUBLIC__TLS__CERT_FILE=$(tls_dir)/server.pem" \
        "TOLLGATE_PUBLIC__TLS__KEY_FILE=$(tls_dir)/server.key" \
        "TOLLGATE_ROUTES__2__UPSTREAM_CA_FILE=$(tls_dir)/ca.pem" \
        -- --config "$REPO/config/gateway.toml"
}
health_gateway() { tollgate_health "$GATEWAY_ADMIN_URL/readyz"; }

prepare_meter_consumer() { require_tollgate tollgate-meter-consumer config/meter-consumer.toml; }
start_meter_consumer() {
    run_tollgate meter-consumer tollgate-meter-consumer \
        -- --config "$REPO/config/meter-consumer.toml"
}
health_meter_consumer() { tollgate_health "$METER_CONSUMER_URL/healthz"; }

# Billing sync: talks to the local stripe-mock unless the caller gives a key.
prepare_billing_sync() { require_tollgate tollgate-billing-sync config/billing-sync.toml; }
start_billing_sync() {
    run_tollgate billing-sync tollgate-billing-sync \
        "TOLLGATE_STRIPE_API_KEY=${TOLLGATE_STRIPE_API_KEY:-sk_test_123}" \
        -- --config "$REPO/config/billing-sync.toml"
}
health_billing_sync() { tollgate_health "$BILLING_SYNC_URL/healthz"; }

# Tenant portal: acts on the gateway's admin API with the admin token; reads usage from
# ClickHouse. Entered through session links: `tollgate portal-session <consumer>`.
prepare_portal() { require_tollgate tollgate-portal config/portal.toml; }
start_portal() {
    local token
    token=$(resolve_admin_token)
    run_tollgate portal tollgate-portal "TOLLGATE_ADMIN_TOKEN=$token" \
        -- --config "$REPO/config/portal.toml"
}
health_portal() { tollgate_health "$PORTAL_URL/healthz"; }
after_portal() {
    log "portal: $PORTAL_URL (open a session: target/release/tollgate portal-session <consumer>, with TOLLGATE_ADMIN_TOKEN set)"
}
