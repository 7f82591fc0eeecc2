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
# The debug line tables (kept in target/ for local backtraces) are four fifths of the binary:
# stripped from the image, which keeps the symbols, so a backtrace still names its functions.
RUN cargo build --release --locked --bin payment-link-worker \
    && cp target/release/payment-link-worker /usr/local/bin/ \
    && strip --strip-debug /usr/local/bin/payment-link-worker

# The run-time image has no shell and no package manager: glibc, the CA certificates (read by
# rustls for the provider's and the broker's TLS) and the binary, run as the image's non-root
# user (65532). Health checks are HTTP (/healthz, /readyz), so nothing else is needed inside.
# Built on Debian 12 like the build stage, so the binary's glibc matches.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/payment-link-worker /usr/local/bin/payment-link-worker
USER 65532:65532
# The probe and metrics port (telemetry.http_listen) and the console's port.
EXPOSE 9464 8088
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK in the image: there is no shell or curl to run one in, and every orchestrator we ship for probes /healthz and /readyz over HTTP (docker-compose.yml, deploy/kubernetes).
ENTRYPOINT ["/usr/local/bin/payment-link-worker"]
CMD ["run"]
