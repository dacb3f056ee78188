# shellcheck shell=bash
# Installs what the stack needs, each step skipped when its result is already there:
# Debian packages, the Kafka jars (Maven), stripe-mock (go install), the Tollgate binaries
# (cargo), and the admin token. Sourced by scripts/stack, never run.

# stripe-mock at the newest version the Go module proxy served when this was written.
STRIPE_MOCK_MODULE=github.com/stripe/stripe-mock
STRIPE_MOCK_VERSION=v0.203.0

# ---------------------------------------------------------------------------------------
# Debian packages

# pkg_present PACKAGE COMMAND_OR_FILE: the package is installed, or (without dpkg) the
# command or file it provides exists.
pkg_present() {
    local status
    if command -v dpkg-query >/dev/null 2>&1; then
        status=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) || status=""
        [[ $status == installed ]] && return 0
    fi
    [[ $2 == /* ]] && [[ -e $2 ]] && return 0
    [[ $2 != /* ]] && command -v "$2" >/dev/null 2>&1
}

ensure_system_packages() {
    local -a missing=() wanted=(
        clickhouse-server:clickhouse-server
        clickhouse-client:clickhouse-client
        redis-server:redis-server
        redis-tools:redis-cli
        cmake:cmake
        libcurl4-openssl-dev:curl-config
        curl:curl
        iproute2:ss
        # The portal's browser tests (headless Chromium over WebDriver).
        chromium:chromium
        chromium-driver:chromedriver
    )
    local entry
    for entry in "${wanted[@]}"; do
        pkg_present "${entry%%:*}" "${entry#*:}" || missing+=("${entry%%:*}")
    done
    command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    ((${#missing[@]} > 0)) || return 0

    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing Debian packages: ${missing[*]}"
    local started=$SECONDS policy=/usr/sbin/policy-rc.d added_policy=""
    # Keep the packages' postinst scripts from starting their system services: the stack runs
    # its own instances on the same ports. (policy-rc.d exit 101 = "action forbidden".)
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        added_policy=1
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$LOG_DIR/apt.log" 2>&1 &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 || rc=$?
    [[ -z $added_policy ]] || as_root rm -f "$policy"
    if ((rc != 0)); then
        tail -n 30 "$LOG_DIR/apt.log" >&2
        die "apt-get install ${missing[*]} failed (exit $rc); full output in $LOG_DIR/apt.log"
    fi
    log "Debian packages installed in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------------------
# Java and Kafka jars

java_bin() {
    if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        printf '%s\n' "$JAVA_HOME/bin/java"
    else
        command -v java || die "no java on PATH (Kafka 4 needs Java 17 or newer)"
    fi
}

check_java() {
    local java version major
    java=$(java_bin)
    version=$("$java" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)
    major=${version%%.*}
    [[ $major =~ ^[0-9]+$ ]] || die "cannot read the Java version from '$java -version'"
    ((major >= 17)) || die "$java is Java $version; Kafka 4 needs Java 17 or newer (set JAVA_HOME)"
}

# ensure_libs NAME: the jars of scripts/NAME/pom.xml (Kafka's broker and tools, ZooKeeper's
# server), resolved by Maven into <state dir>/NAME/libs. Current, and skipped, while the
# folder's stamp names the pom's NAME.version and the pom itself.
ensure_libs() {
    local name=$1 pom=$STACK_SCRIPTS/$1/pom.xml dir=$STACK_DIR/$1 version stamp
    version=$(sed -n "s|.*<$name.version>\(.*\)</$name.version>.*|\1|p" "$pom" | head -n 1)
    stamp="$name $version pom $(sha256sum "$pom" | cut -c1-16)"
    if [[ -f $dir/libs/.stamp && $(<"$dir/libs/.stamp") == "$stamp" ]]; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || die "no mvn on PATH (Debian package maven)"
    log "resolving $name $version jars with Maven (log: $LOG_DIR/maven.log)"
    local started=$SECONDS
    rm -rf "$dir/libs.new" "$dir/mvn-build"
    mkdir -p "$dir/libs.new"
    if ! mvn -B -ntp -f "$pom" dependency:copy-dependencies \
        "-D$name.libs.dir=$dir/libs.new" "-D$name.build.dir=$dir/mvn-build" \
        >"$LOG_DIR/maven.log" 2>&1 9>&-; then
        tail -n 30 "$LOG_DIR/maven.log" >&2
        die "mvn could not resolve the $name jars; full output in $LOG_DIR/maven.log"
    fi
    compgen -G "$dir/libs.new/$name*-$version.jar" >/dev/null || die "mvn ran but no $name $version jar in $dir/libs.new"
    printf '%s\n' "$stamp" >"$dir/libs.new/.stamp"
    rm -rf "$dir/libs" "$dir/mvn-build"
    mv "$dir/libs.new" "$dir/libs"
    log "$name jars ready in $((SECONDS - started))s ($(find "$dir/libs" -name '*.jar' | wc -l) jars)"
}

# ---------------------------------------------------------------------------------------
# stripe-mock

stripe_mock_bin() { printf '%s/bin/stripe-mock\n' "$STACK_DIR"; }

ensure_stripe_mock() {
    local bin
    bin=$(stripe_mock_bin)
    if [[ -x $bin ]] && go version -m "$bin" 2>/dev/null |
        grep -Eq "^[[:space:]]+mod[[:space:]]+${STRIPE_MOCK_MODULE}[[:space:]]+${STRIPE_MOCK_VERSION}([[:space:]]|$)"; then
        return 0
    fi
    command -v go >/dev/null 2>&1 || die "no go on PATH (stripe-mock $STRIPE_MOCK_VERSION needs Go 1.22 or newer)"
    log "installing stripe-mock $STRIPE_MOCK_VERSION with go install (log: $LOG_DIR/go-install.log)"
    local started=$SECONDS
    mkdir -p "$STACK_DIR/bin"
    # GOTOOLCHAIN=local: build with this Go or fail clearly; never fetch another toolchain.
    # First from the module cache alone, used as a file proxy (a new state dir on a machine
    # that built it before needs no network), then through the configured module proxy.
    local cache
    cache=$(go env GOMODCACHE)/cache/download
    if ! GOBIN="$STACK_DIR/bin" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOPROXY="file://$cache" \
        go install "$STRIPE_MOCK_MODULE@$STRIPE_MOCK_VERSION" >"$LOG_DIR/go-install.log" 2>&1 9>&- &&
        ! GOBIN="$STACK_DIR/bin" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
            go install "$STRIPE_MOCK_MODULE@$STRIPE_MOCK_VERSION" >>"$LOG_DIR/go-install.log" 2>&1 9>&-; then
        tail -n 30 "$LOG_DIR/go-install.log" >&2
        die "go install $STRIPE_MOCK_MODULE@$STRIPE_MOCK_VERSION failed; full output in $LOG_DIR/go-install.log"
    fi
    log "stripe-mock installed in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------------------
# Tollgate binaries

target_dir() {
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir="$REPO/$dir"
    printf '%s\n' "$dir"
}

tollgate_bin() { printf '%s/release/%s\n' "$(target_dir)" "$1"; }

# `scripts/stack test` sets BUILD_FOR_TESTS: the services are then built in one cargo call
# with the tests. Cargo resolves features once per call, and the tests' dev-dependencies
# turn on features of shared crates (regex-syntax, time, rustix...) that a bins-only build
# leaves off; built apart, every crate above those would be compiled twice.
build_tollgate() {
    command -v cargo >/dev/null 2>&1 || die "no cargo on PATH (install Rust with rustup, or source ~/.cargo/env)"
    local -a build=(cargo build --release --workspace --bins)
    [[ -z ${BUILD_FOR_TESTS:-} ]] || build+=(--tests --features "$STACK_TEST_FEATURES")
    log "building Tollgate: ${build[*]}"
    local started=$SECONDS
    (cd "$REPO" && "${build[@]}") >&2 9>&- || die "${build[*]} failed"
    log "Tollgate built in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------------------
# Admin token for the gateway's admin API

token_file() { printf '%s/admin-token\n' "$STACK_DIR"; }

new_admin_token() {
    printf 'tg_admin_%s\n' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
}

write_admin_token() {
    local file
    file=$(token_file)
    (
        umask 077
        printf '%s\n' "$1" >"$file.tmp"
    )
    mv -f "$file.tmp" "$file"
}

stored_admin_token() {
    local file
    file=$(token_file)
    [[ -s $file ]] && head -n 1 "$file"
    return 0
}

# The token a gateway started now gets: the caller's TOLLGATE_ADMIN_TOKEN, else the stored
# one, else a new one. Stored in <state dir>/admin-token (mode 600) either way.
resolve_admin_token() {
    local token
    token=${TOLLGATE_ADMIN_TOKEN:-$(stored_admin_token)}
    [[ -n $token ]] || token=$(new_admin_token)
    [[ $token == "$(stored_admin_token)" ]] || write_admin_token "$token"
    printf '%s\n' "$token"
}

# The token to print: the stored one while our gateway runs (it is the one it was given),
# else what a new start would use.
current_admin_token() {
    if [[ -n $(part_pid gateway) && -n $(stored_admin_token) ]]; then
        stored_admin_token
    else
        resolve_admin_token
    fi
}
