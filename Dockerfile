# The relay image: outbox-relay (and outbox-demo, the example producer/consumer).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p outbox-relay -p outbox-tests --bin outbox-relay --bin outbox-demo

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/outbox-relay /src/target/release/outbox-demo /usr/local/bin/
USER relay
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
