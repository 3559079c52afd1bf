# The image: outbox-relay and outbox-consumer (the consumer's dead-letter command), and the
# examples: outbox-bookstore (the saga demo) and outbox-demo (the throughput demo).
FROM rust:1-bookworm AS build
# librdkafka is compiled with cmake, with TLS (OpenSSL), SASL (Cyrus SASL for GSSAPI),
# OIDC token fetches (libcurl) and the zlib codec.
RUN apt-get update && apt-get install -y --no-install-recommends \
        cmake pkg-config libssl-dev libsasl2-dev libcurl4-openssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p outbox-relay -p outbox-consumer -p outbox-bookstore \
        -p outbox-tests --features outbox-consumer/cli \
        --bin outbox-relay --bin outbox-consumer --bin outbox-bookstore --bin outbox-demo

FROM debian:bookworm-slim
# The shared libraries librdkafka links to, CA certificates for TLS, and curl for the
# container health check (GET /readyz).
RUN apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates libssl3 libsasl2-2 libsasl2-modules-gssapi-mit libcurl4 zlib1g curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/outbox-relay /src/target/release/outbox-consumer \
     /src/target/release/outbox-bookstore /src/target/release/outbox-demo /usr/local/bin/
USER relay
EXPOSE 9477
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD curl -fsS http://127.0.0.1:9477/readyz || exit 1
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
