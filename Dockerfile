# Multi-stage build: compile with the Rust toolchain, run on a distroless base as non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin kbs-affinity-proxy \
 && strip target/release/kbs-affinity-proxy

# glibc + libgcc only, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kbs-affinity-proxy /usr/local/bin/kbs-affinity-proxy
USER 65532:65532
# 8080: clients; 9090: the admin port (/healthz, /readyz, /metrics) when --admin-listen is given.
EXPOSE 8080 9090
# Distroless has no shell or curl: the binary checks itself. Needs --admin-listen on port 9090.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/kbs-affinity-proxy", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/kbs-affinity-proxy"]
