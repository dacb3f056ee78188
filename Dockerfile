# Tollgate's services, the tenant portal and the demo upstream in one image; docker-compose.yml picks
# the binary per service. Build: docker build -t tollgate .
FROM rust:1.95-bookworm AS build
# rdkafka builds its bundled librdkafka with cmake; librdkafka >= 2.11 includes curl headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
    && mkdir /out \
    && cp target/release/tollgate-gateway target/release/tollgate-meter-consumer \
          target/release/tollgate-billing-sync target/release/tollgate-demo-upstream \
          target/release/tollgate-portal target/release/tollgate /out/

FROM debian:bookworm-slim
# curl serves the compose healthchecks; ca-certificates the TLS calls to Stripe.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libcurl4 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 tollgate \
    && mkdir -p /var/lib/tollgate/spool /var/lib/tollgate/tls \
    && chown -R tollgate /var/lib/tollgate
COPY --from=build /out/ /usr/local/bin/
COPY config/ /etc/tollgate/
USER tollgate
