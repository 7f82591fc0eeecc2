# Builds the payment-link-worker binary; the same image runs the worker, migrations, the provider
# simulator, the operators' console and `send` (the subcommand is the container command).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY config config
# Cargo reads every target the manifest names, benchmarks included (they are not built here).
COPY benches benches
RUN cargo build --release --locked --bin payment-link-worker && cp target/release/payment-link-worker /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 worker
COPY --from=build /usr/local/bin/payment-link-worker /usr/local/bin/payment-link-worker
USER worker
ENTRYPOINT ["payment-link-worker"]
CMD ["run"]
